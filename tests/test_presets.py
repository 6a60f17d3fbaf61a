"""Every study preset composes and validates, toy and paper alike, and sweeps what it says."""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from harness.validation import validate
from tests.conftest import CONF

PRESETS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                 for p in (CONF / "experiment").rglob("*.yaml") if not p.name.startswith("_"))


def test_toy_and_paper_variants_exist():
    for study in ("poison_ratio", "sample_number", "tasks", "architectures",
                  "ref_teacher_ablation", "ref_teacher_hparams"):
        assert f"toy/{study}" in PRESETS and f"paper/{study}" in PRESETS, study


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_validates_and_names_its_sweep(preset, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={preset}",
                                           f"paths.artifacts={tmp_path}"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params)
    assert params, "a study sweeps something"
    assert cfg.hydra.sweep.dir == f"multirun/{cfg.study}"
    assert cfg.study == preset.replace("/", "_")
    with open_dict(cfg):
        del cfg["hydra"]
    run = validate(cfg)
    if preset.startswith("paper/"):
        assert run.model.source == "hf" and run.trainer.accelerator == "gpu"
        assert run.protocol.name == "vaccine" and run.judge.name == "beaver_dam"
    elif preset.startswith("real/"):  # the GGUF model on CPU, real data and judge throughout
        assert run.model.gguf and run.trainer.accelerator == "cpu"
        assert run.protocol.name == "real_cpu" and run.judge.name == "keyword"
        assert run.template.name == "chat" and run.alignment.data.source == "package"
    else:
        assert run.model.source == "tiny"


# sweep axes that change what a run reads (the others change training, not data)
DATA_AXES = ("task", "attack", "attack_pool", "alignment", "world", "defense", "posthoc",
             "attack.k", "defense.filter.tau_from")


def _compose(preset, *overrides, hydra=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"+experiment={preset}", *overrides],
                       return_hydra_config=hydra)


def _sweep(cfg):
    """The sweep's plain lists (a=x,y); Optuna's interval(...) and the like are left out."""
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()
            if "(" not in str(v)}


def test_every_sweep_point_mixes_the_dose_it_records():
    """attack.p x attack.n of every preset: no point whose p*n rounds to no harmful row (or,
    replacing, to no task row)."""
    import itertools

    from harness.data.mixing import check_ratio

    points = 0
    for preset in PRESETS:
        cfg = _compose(preset, hydra=True)
        sweep = _sweep(cfg)
        for p, n in itertools.product(sweep.get("attack.p", [cfg.attack.p]),
                                      sweep.get("attack.n", [cfg.attack.n])):
            check_ratio(float(p), int(n), cfg.attack.mode)  # raises where it rounds away
            points += 1
    assert points > len(PRESETS)


def _data_fingerprint(run):
    from dataclasses import asdict

    from harness.artifacts import artifact_key

    return artifact_key({"task": asdict(run.task), "alignment": asdict(run.alignment),
                         "attack": asdict(run.attack), "eval": asdict(run.eval),
                         "world": asdict(run.world), "align": run.defense.align.module,
                         "posthoc": run.posthoc.module, "tau": run.defense.filter.tau_from,
                         "data": asdict(run.data)})


@pytest.mark.slow  # a toy world per data setting: about a minute
def test_every_presets_data_pass_the_leak_checks(tmp_path):
    """Every data setting of the toy and real presets' sweeps loads and shares no prompt
    between what it trains on and what it scores. The paper presets read the hub, which the
    tests do not reach: the run checks their data at start-up."""
    import itertools

    from harness.data.assemble import RunInputs

    loaded = set()
    for preset in (p for p in PRESETS if not p.startswith("paper/")):
        sweep = _sweep(_compose(preset, hydra=True))
        axes = [k for k in sweep if k in DATA_AXES]
        for values in itertools.product(*(sweep[k] for k in axes)):
            cfg = _compose(preset, f"paths.artifacts={tmp_path}",
                           *(f"{k}={v}" for k, v in zip(axes, values)))
            run = validate(cfg)
            key = _data_fingerprint(run)
            if key not in loaded:
                loaded.add(key)
                RunInputs(run).load()  # raises DataLeak or DataError
    assert len(loaded) >= 10, len(loaded)
