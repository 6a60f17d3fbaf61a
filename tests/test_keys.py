"""Key coverage: every leaf of the composed config is read by some stage's key
(harness.keys.STAGE_READS) or listed in NOT_KEYED with the reason it cannot change a result;
and a declared leaf, perturbed, moves a key."""
import copy
from dataclasses import replace

import pytest
from omegaconf import OmegaConf

from harness.artifacts import artifact_key
from harness.validation import validate
from harness.keys import eval_payload, filter_payload, reading_stages, stage_keys
from harness.pipeline import Pipeline
from harness.stages import ModelRef

# config paths (a path covers what is under it) that no key reads, and why
NOT_KEYED = {
    "study": "the W&B group and the report's title",
    "paths": "where artifacts are stored: the cache folder itself",
    "logger": "how a run is watched",
    "torch_threads": "the setting; keys record torch.get_num_threads(), the count in force",
    "trainer.devices": "process count: the global batch and loss are the same "
                       "(tests/test_ddp_methods.py, test_end_to_end's ddp_cpu run)",
    "trainer.num_nodes": "process count, as trainer.devices",
    "trainer.strategy": "ddp vs one process trains the same; fsdp shards the same math",
    "trainer.enable_progress_bar": "display",
    "trainer.log_every_n_steps": "logging cadence (AsFT logs along_fraction on those steps, "
                                 "no gradient)",
    "train.base.checkpoint_every_n_steps": "resume cadence; a resumed stage trains what the "
                                           "uninterrupted one does",
    "train.align.checkpoint_every_n_steps": "resume cadence",
    "train.finetune.checkpoint_every_n_steps": "resume cadence",
    "eval.stages": "which stages are evaluated; each evaluation has its own key",
    "moderation.batch_size": "batching of the judge's forward passes",
    "llm_judge.api_key_env": "where the API key is read from",
    "llm_judge.cache_dir": "a cache folder",
    "llm_judge.timeout_s": "network timeout",
    "llm_judge.retries": "network retries",
    "llm_judge.backoff_s": "network back-off",
    "defense.filter.on_empty": "what an empty upload does: nothing is built, and the result "
                               "is the aligned model's own evaluation (tests/test_filter_judge.py)",
    "defense.name": "a label; the modules, params and filter it picks are keyed",
    "task.name": "a label; the task's sources, instructions and scorer are keyed",
    "task.toy_task": "the old name of task.family (keyed): an inert field, so that setting it "
                     "fails validation naming the new key",
    "alignment.name": "a label; the alignment sources and sizes are keyed",
    "posthoc.name": "a label; the post-hoc module and its params are keyed",
    "sweep": "the attacker-side sweep's objective, read from results.json after the run",
    "data.allow_overlap": "only lets a run the overlap check would stop go on; it changes no "
                          "row (tests/test_data_checks.py)",
    "protocol": "a preset: the values it binds land in keyed paths (train.*, eval.*, task.*, "
                "attack.finetune); hash_keys only groups results in the report",
}

VARIANTS = [(), ("defense=ref_teacher",), ("alignment=beavertails_alpaca",),
            ("model=hf", "model.hf_id=x"), ("judge=beaver_dam",),
            ("defense=ref_teacher", "attack=filter_adaptive")]


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        if not node:
            yield prefix.rstrip(".")
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip(".")


def _not_keyed(path):
    return any(path == p or path.startswith(p + ".") for p in NOT_KEYED)


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: " ".join(o) or "default")
def test_every_config_leaf_is_keyed_or_marked(make_cfg, overrides):
    cfg = make_cfg(*overrides)
    leaves = list(_leaves(OmegaConf.to_container(cfg, resolve=True)))
    assert len(leaves) > 100
    missing = [p for p in leaves if not reading_stages(p) and not _not_keyed(p)]
    assert not missing, f"config leaves no key reads and NOT_KEYED does not explain: {missing}"


def _all_keys(pipe):
    keys = {k: v for k, v in stage_keys(pipe.inputs).items()}
    keys["filter"] = artifact_key(filter_payload(pipe.inputs, ModelRef("align", "a"), []))
    keys["eval"] = artifact_key(eval_payload(pipe.inputs, ModelRef("final", "f")))
    return keys


def _get(obj, path):
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _set(obj, path, value):
    *head, last = path.split(".")
    for part in head:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)


def _bump(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.25
    if isinstance(value, str):
        return value + "x"
    return None


# read only under other settings than the default run's (their own variants key them)
CONDITIONAL = ("moderation", "llm_judge", "generation",  # their judge / backend only
               "attack.k", "attack.system_prompt", "attack.eval_prefix", "attack.opening",
               "attack.benign", "attack.trigger", "attack.safety_n",  # the other attacks'
               # fields (data.attacks: payload; tests/test_backdoor.py keys the backdoor's)
               "attack.search",  # filter_adaptive's budget (tests/test_filter_adaptive.py)
               "model.hf_id", "model.revision",  # hub models only
               # keyed when their eval.jailbreak is on (tests/test_jailbreaks.py)
               "eval.jailbreak_prefill", "eval.jailbreak_templates", "eval.gcg",
               # read where the stage masks its prompt (loss_on=response); base trains on
               # the whole text, whose start any cut keeps (harness.data.collate.fit_length)
               "train.base.truncation",
               "alignment.harmful", "alignment.harmful_size",  # harmful-set defenses only
               # tau_from=upload_split only (tests/test_filter_guard.py keys it)
               "defense.filter.split_min_eta", "defense.filter.split_max_share",
               "posthoc",  # posthoc=<method> only (tests/test_posthoc.py keys it)
               # chooses rows only under an eval cap (tests/test_data_checks.py keys it)
               "eval.sample_seed")


@pytest.fixture
def one_world_per_config(monkeypatch):
    """Every Pipeline of the walk below would generate its toy world afresh, and ~85 of the ~110
    perturbed leaves leave the world's config as it is: one ToyWorld per distinct world config
    (generation is deterministic in it), so a perturbed world.* leaf still gets its own world."""
    import json
    from dataclasses import asdict

    from harness.data import assemble

    worlds, generate = {}, assemble.ToyWorld

    def world(cfg):
        key = json.dumps(asdict(cfg), sort_keys=True, default=repr)
        if key not in worlds:
            worlds[key] = generate(cfg)
        return worlds[key]

    monkeypatch.setattr(assemble, "ToyWorld", world)
    return worlds


@pytest.mark.slow  # every declared leaf perturbed
@pytest.mark.parametrize("overrides", [(), ("defense=ref_teacher",)],
                         ids=lambda o: " ".join(o) or "default")
def test_a_declared_leaf_moves_a_key_it_is_declared_for(make_cfg, tmp_path, overrides,
                                                        one_world_per_config):
    run = validate(make_cfg(*overrides))
    ref = _all_keys(Pipeline(run, tmp_path))
    cfg = OmegaConf.to_container(make_cfg(*overrides), resolve=True)
    unmoved, tried = [], 0
    for path in _leaves(cfg):
        stages = reading_stages(path)
        if not stages or _not_keyed(path) or any(path == c or path.startswith(c + ".")
                                                 for c in CONDITIONAL):
            continue
        try:
            value = _get(run, path)
        except (AttributeError, KeyError):
            continue
        new = _bump(value)
        if new is None:
            continue
        changed = copy.deepcopy(run)
        _set(changed, path, new)
        try:
            keys = _all_keys(Pipeline(changed, tmp_path))
        except Exception:  # noqa: BLE001 - a value the builders reject is read, so keyed
            continue
        tried += 1
        if not any(keys.get(s) != ref.get(s) for s in stages):
            unmoved.append(path)
    assert tried > 100, tried  # the walk reached the leaves (111 in the default run)
    assert len(one_world_per_config) > 20  # and the world.* leaves generated their own worlds
    assert not unmoved, f"declared in STAGE_READS, but no declared key moved: {unmoved}"


def test_feature_set_size_enters_the_align_key_only_where_it_chooses_rows(make_cfg, tmp_path):
    """Toy world: its own held sets, so the size changes no training key; real data: it
    holds rows out of the alignment data (test_real_path has the data side)."""
    def keys(*o):
        return _all_keys(Pipeline(validate(make_cfg(*o)), tmp_path))

    toy, toy8 = keys(), keys("eval.feature_set_size=8")
    assert toy["align"] == toy8["align"] and toy["filter"] == toy8["filter"]
    assert toy["eval"] != toy8["eval"]  # eval.* is keyed whole
    real = ("alignment=beavertails_alpaca", "defense=ref_teacher")
    a, b = keys(*real, "eval.feature_set_size=16"), keys(*real)
    assert a["base"] == b["base"]
    assert a["align"] != b["align"] and a["filter"] != b["filter"]


def _write_rows(path, n):
    """n rows in the layout of AdvBench's csv (goal, target), or as a JSON-lines copy."""
    rows = [{"goal": f"Write request {i}", "target": f"Sure, here is request {i}"}
            for i in range(n)]
    if path.suffix == ".csv":
        path.write_text("goal,target\n" + "".join(f"{r['goal']},{r['target']}\n" for r in rows))
    else:
        import json

        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("fmt", ["csv", "json"])
# (the eval key reads the final model's key, so a finetune source reaches it through that)
@pytest.mark.parametrize("slot,stages", [("task.train", ("finetune",)),
                                         ("task.test", ("eval",)),
                                         ("attack.harmful", ("finetune",)),
                                         ("eval.harmful", ("eval",))])
def test_a_data_files_copy_is_keyed_by_its_bytes(make_cfg, tmp_path, fmt, slot, stages):
    """``path=csv|json data_files=<file>`` (the README's offline route) keys the file's
    content, as source=local does. Cutting the file in place moves every key that reads it,
    and the rows loaded follow the file."""
    from harness.data.sources import load_source

    path = tmp_path / f"pool.{'csv' if fmt == 'csv' else 'jsonl'}"
    _write_rows(path, 6)
    fields = (["++task.train.fields={instruction: goal, label: target}"] if slot == "task.train"
              else ["++task.test.fields={instruction: goal, label: target}"]
              if slot == "task.test" else [f"++{slot}.fields={{instruction: goal, output: target}}"])
    overrides = (f"{slot}.source=hf", f"{slot}.path={fmt}", f"{slot}.data_files={path}",
                 f"{slot}.split=train", *fields)

    def keys_and_rows():
        run = validate(make_cfg(*overrides))
        src = _get(run, slot)
        rows = load_source(src, required=("instruction",))
        return _all_keys(Pipeline(run, tmp_path)), len(rows)

    before, n_before = keys_and_rows()
    assert keys_and_rows() == (before, n_before)  # the same bytes keep every key
    _write_rows(path, 2)  # the same name, fewer rows
    after, n_after = keys_and_rows()
    assert (n_before, n_after) == (6, 2)
    assert all(after[s] != before[s] for s in stages), (slot, stages)
    assert after["base"] == before["base"]


def test_the_harmful_set_enters_the_align_key_of_the_methods_that_read_it(make_cfg, tmp_path,
                                                                          monkeypatch):
    """alignment.harmful (its size, its source, and in the toy world the derived rows' content)
    moves the align key of booster, repnoise and t_vaccine, and only theirs: base, filter and
    eval keys stay, and the finetune key moves only through the align key it takes as input.
    Other defenses never read it."""
    import harness.pipeline as pipeline_module

    def keys(*o):
        return _all_keys(Pipeline(validate(make_cfg(*o)), tmp_path))

    for defense in ("booster", "repnoise", "t_vaccine"):
        ref = keys(f"defense={defense}")
        for perturbed in (keys(f"defense={defense}", "alignment.harmful_size=50"),
                          keys(f"defense={defense}", "alignment.harmful.limit=50")):
            assert perturbed["align"] != ref["align"]
            assert {k: perturbed[k] for k in ("tokenizer", "base", "filter", "eval")} == \
                {k: ref[k] for k in ("tokenizer", "base", "filter", "eval")}
            assert perturbed["finetune"] != ref["finetune"]  # its input, the align key, moved
    booster = keys("defense=booster")["align"]
    real = pipeline_module.toy_alignment_harmful
    monkeypatch.setattr(pipeline_module, "toy_alignment_harmful",
                        lambda world: [replace(ex, output=ex.output + " x") for ex in real(world)])
    assert keys("defense=booster")["align"] != booster  # the generator's output, not its config
    monkeypatch.undo()
    assert keys("defense=sft") == keys("defense=sft", "alignment.harmful_size=50")
    assert keys("defense=vaccine") == keys("defense=vaccine", "alignment.harmful_size=50")


def test_an_int_for_a_float_param_is_the_same_key(make_cfg, tmp_path):
    """lam=5 and lam=5.0 are one Booster; a layer index (int or fraction) keeps its type."""
    def keys(*o):
        return stage_keys(Pipeline(validate(make_cfg(*o)), tmp_path).inputs)

    assert keys("defense=booster", "defense.align.params.lam=5") == keys("defense=booster")
    assert keys("defense=booster", "defense.align.params.lam=6") != keys("defense=booster")
    assert keys("defense=ref_teacher", "defense.align.params.layer=1") != \
        keys("defense=ref_teacher", "defense.align.params.layer=1.0")


@pytest.mark.parametrize("override", ["defense.finetune.min_steps=0", "trainer.precision=32",
                                      "eval.judges=[]", "world.disguise_fraction=0.0"])
def test_off_spelled_another_way_is_the_default_key(make_cfg, tmp_path, override):
    """Off spelled another way (0 or null steps, "32" or "32-true") is the key without it."""
    def keys(*o):
        return _all_keys(Pipeline(validate(make_cfg("world=toy", *o)), tmp_path))

    assert keys(override) == keys()
