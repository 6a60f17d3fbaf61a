"""Offline, CPU-only test setup. The environment is set before anything imports HF or W&B."""
import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="harness-test-cache-")
for key, value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
    "HF_HOME": os.path.join(_CACHE, "hf"), "WANDB_DIR": os.path.join(_CACHE, "wandb"),
    "WANDB_CACHE_DIR": os.path.join(_CACHE, "wandb-cache"),
    "MPLCONFIGDIR": os.path.join(_CACHE, "mpl"),
}.items():
    os.environ[key] = value
os.environ.pop("WANDB_API_KEY", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from harness.config import register  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
register()

# The end-to-end tests run the default toy world at full size (about 2 minutes on 2 cores): the
# reduced sizes tried (base 250-500 steps) were not reliable on every seed; the defaults held
# on the three calibration seeds.
# Its margins were measured on the calibrated world (world=toy) with Ref-Teacher's student at
# its data's own budget (experiments/thread_noise), so it pins both.
E2E = ["logger=none", "trainer.enable_progress_bar=false", "eval.stages=[final]", "world=toy",
       "defense.finetune.min_steps=null"]


def pytest_collection_modifyitems(config, items):
    """The longest work first (a stable sort): the xdist groups (a module sharing one expensive
    fixture), then the slow tests, then the rest. xdist hands out work in this order, so the
    end-to-end group starts at once on one worker and the short tests fill the gaps at the end,
    instead of a long test starting last."""
    items.sort(key=lambda item: (item.get_closest_marker("xdist_group") is None,
                                 item.get_closest_marker("slow") is None))


def conf_template(name: str):
    """conf/template/<name>.yaml as a TemplateConfig: a prompt format is written only there."""
    from omegaconf import OmegaConf

    from harness.config.template import TemplateConfig

    node = OmegaConf.merge(OmegaConf.structured(TemplateConfig),
                           OmegaConf.load(CONF / "template" / f"{name}.yaml"))
    return OmegaConf.to_object(node)


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real config with overrides, artifacts under the test's tmp dir."""

    def _make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[f"paths.artifacts={tmp_path / 'artifacts'}",
                                                *overrides])

    return _make
