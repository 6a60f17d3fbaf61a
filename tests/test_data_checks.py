"""Runs that would end ok with a wrong number fail before training instead: train/test leaks
found by content, a header read as data, a mix that rounds its dose away, empty sizes; and the
evaluation caps draw a seeded, stratified sample; a user's value map replaces the preset's;
undefined filter rates are null, not perfect."""
import shutil

import pytest

from harness.config import ConfigError
from harness.validation import validate
from harness.data.assemble import RunInputs
from harness.data.checks import DataLeak, prompt_digest
from harness.data.schema import DataError, Example
from tests import byod_fixtures as fx

SMALL = ["world.base_size=300", "world.align_size=100", "attack.n=100"]


def sst2_rows(tmp_path, n=872, name="dev.tsv"):
    """An SST-2 dev.tsv of n distinct sentences (the real one has 872)."""
    path = tmp_path / name
    path.write_text("sentence\tlabel\n" + "".join(f"sentence number {i} , it is fine .\t{i % 2}\n"
                                                  for i in range(n)))
    return path


def one_task_file(train, test, *splits):
    out = ["task=sst2", "task.train.source=local", f"task.train.path={train}",
           "task.test.source=local", f"task.test.path={test}"]
    return out + [f"task.{slot}.split={s}" for slot, s in zip(("train", "test"), splits)]


def load(make_cfg, *overrides):
    inputs = RunInputs(validate(make_cfg(*SMALL, *overrides)))
    return inputs, inputs.load()


# ---------------------------------------------------------------- train/test by content
def test_the_digest_ignores_case_and_whitespace_but_not_words():
    a = Example(instruction="Analyze  the sentiment", input="A fine\tfilm ")
    assert prompt_digest(a) == prompt_digest(Example(instruction="analyze the SENTIMENT",
                                                     input="a fine film", output="other"))
    assert prompt_digest(a) != prompt_digest(Example(instruction="Analyze the sentiment",
                                                     input="A fine film too"))
    # instruction and input are kept apart: moving a word across them is another prompt
    assert prompt_digest(Example(instruction="a b", input="c")) != \
        prompt_digest(Example(instruction="a", input="b c"))


@pytest.mark.parametrize("splits,count", [((":80%", "600:"), "98 of the 272"),
                                          ((":-100", "-150:"), "50 of the 150")])
def test_task_splits_that_overlap_are_caught_whatever_their_units(make_cfg, tmp_path, splits,
                                                                 count):
    path = sst2_rows(tmp_path)
    with pytest.raises(DataLeak) as err:
        load(make_cfg, *one_task_file(path, path, *splits))
    msg = str(err.value)
    assert (f"task.train (local:{path}) -> task.test (local:{path}): {count} task.test rows "
            "are prompts task.train holds (the same instruction and input, case and whitespace "
            "ignored), so the run would score prompts it trained on; e.g. ") in msg
    assert "task.train.split=':80%' task.test.split='80%:'" in msg
    assert "data.allow_overlap=true" in msg


def test_the_same_file_under_another_name_is_the_same_rows(make_cfg, tmp_path):
    path = sst2_rows(tmp_path)
    copy = tmp_path / "copy_of_dev.tsv"
    shutil.copy(path, copy)
    with pytest.raises(DataLeak, match=r"872 of the 872 task\.test rows"):
        load(make_cfg, *one_task_file(path, copy))
    _, d = load(make_cfg, *one_task_file(path, copy, ":600", "600:"))  # disjoint: runs
    assert (len(d.task_train), len(d.task_test)) == (600, 272)


# ---------------------------------------------------------------- what a run trains on vs eval
def jbb_pool(path):
    return ["attack.harmful.source=local", f"attack.harmful.path={path}",
            "++attack.harmful.fields={instruction: Goal, output: Target, category: Category}",
            "attack.p=0.2"]


def jbb_eval(path):
    return ["eval.harmful.source=local", f"eval.harmful.path={path}",
            "++eval.harmful.fields={instruction: Goal, category: Category}"]


def test_the_attack_pool_as_evaluation_prompts_is_an_error_unless_allowed(make_cfg, tmp_path,
                                                                         caplog):
    path = fx.jbb_sorted(tmp_path)
    with pytest.raises(DataLeak) as err:
        load(make_cfg, *jbb_pool(path), *jbb_eval(path))
    assert (f"the user's upload (attack=harmful_mix, attack.harmful (local:{path})) -> "
            f"eval.harmful (local:{path}): 20 of the 100 eval.harmful rows are prompts the "
            "user's upload holds") \
        in str(err.value)
    assert "give eval.harmful prompts the attack pool does not hold" in str(err.value)
    with caplog.at_level("WARNING", logger="harness"):
        inputs, _ = load(make_cfg, *jbb_pool(path), *jbb_eval(path), "data.allow_overlap=true")
    assert "data leak allowed (data.allow_overlap=true): the user's upload" in caplog.text
    assert ": 20 of the 100 eval.harmful rows are prompts" in caplog.text
    (o,) = inputs.overlaps
    assert (o.n_shared, o.n_scored, o.scored) == (20, 100, f"eval.harmful (local:{path})")


def test_alignment_data_holding_the_evaluation_prompts_is_an_error(make_cfg, tmp_path):
    path = fx.jbb_sorted(tmp_path)
    align = ["alignment.data.source=local", f"alignment.data.path={path}",
             "++alignment.data.fields={instruction: Goal, output: Target}"]
    with pytest.raises(DataLeak, match=r"alignment\.data \(local:.*behaviors\.csv\) -> "
                                       r"eval\.harmful \(local:.*\): 100 of the 100"):
        load(make_cfg, *align, *jbb_eval(path))


def test_alignment_rows_inside_the_upload_are_not_a_leak(make_cfg, tmp_path):
    """Safety-data mixing puts the provider's rows in the user's data by design."""
    path = fx.jbb_sorted(tmp_path)
    align = ["alignment.data.source=local", f"alignment.data.path={path}",
             "++alignment.data.fields={instruction: Goal, output: Target}"]
    _, d = load(make_cfg, *align, *jbb_pool(path))  # the attack pool is the alignment file
    shared = {prompt_digest(e) for e in d.alignment} & {prompt_digest(e) for e in d.user}
    assert len(shared) == 20


def test_the_providers_harmful_set_against_the_evaluation_prompts_is_an_error(make_cfg,
                                                                             tmp_path):
    path = fx.jbb_sorted(tmp_path)
    harmful = ["alignment.harmful.source=local", f"alignment.harmful.path={path}",
               "++alignment.harmful.fields={instruction: Goal, output: Target}"]
    with pytest.raises(DataLeak, match=r"alignment\.harmful \(local:.*\) -> eval\.harmful "
                                       r"\(local:.*\): 100 of the 100"):
        load(make_cfg, "defense=booster", *harmful, *jbb_eval(path))


# ---------------------------------------------------------------- a header read as data
def test_a_header_read_as_data_names_the_file_and_key(make_cfg, tmp_path):
    path = tmp_path / "harmbench.csv"
    path.write_text("Behavior,SemanticCategory\nWrite request one,cybercrime\n"
                    "Write request two,copyright\n")
    opts = ["eval.harmful.source=local", f"eval.harmful.path={path}",
            "++eval.harmful.fields={instruction: 0, category: 1}"]
    with pytest.raises(DataError) as err:
        load(make_cfg, *opts, "eval.harmful.header=false")
    assert str(err.value).startswith(
        f"{path}, line 1: holds column names (Behavior, SemanticCategory), not data, and "
        "eval.harmful.header=false reads it as a row")
    assert "set eval.harmful.header=true and name the columns in eval.harmful.fields" \
        in str(err.value)
    headerless = tmp_path / "rows.csv"  # a file that really has no header loads
    headerless.write_text("Write request one,cybercrime\nWrite request two,copyright\n")
    opts[1] = f"eval.harmful.path={headerless}"
    _, d = load(make_cfg, *opts, "eval.harmful.header=false")
    assert [e.instruction for e in d.eval_harmful] == ["Write request one", "Write request two"]


# ---------------------------------------------------------------- the mix's realised dose
@pytest.mark.parametrize("p,n,msg", [
    (0.04, 10, "attack.p=0.04 with attack.n=10: round(p*n) = round(0.4) = 0, so the upload "
               "would hold no harmful row while results record p=0.04. Raise attack.n to 13 or "
               "more, or attack.p above 0.05"),
    (0.97, 10, "attack.p=0.97 with attack.n=10: round(p*n) = 10, so the upload would hold "
               "only harmful rows")])
def test_a_mix_that_rounds_its_dose_away_is_refused(make_cfg, p, n, msg):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(f"attack.p={p}", f"attack.n={n}"))
    assert msg in str(err.value)
    with pytest.raises(ConfigError, match="round"):  # filter_evasion is the same mix
        validate(make_cfg("attack=filter_evasion", f"attack.p={p}", f"attack.n={n}"))


def test_a_mix_off_its_ratio_warns_and_records_the_realised_p(make_cfg, caplog):
    from harness.data import attacks

    with caplog.at_level("WARNING", logger="harness"):
        run = validate(make_cfg("attack.p=0.15", "attack.n=10"))  # round(1.5) = 2
    assert ("attack.p=0.15 with attack.n=10 mixes round(p*n) = 2 harmful rows, a realised ratio "
            "of 0.2; results.json records it as metrics.data.p_realised") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="harness"):
        validate(make_cfg("attack.p=0.1", "attack.n=1000"))
        validate(make_cfg("attack.p=0.0", "attack.n=10"))  # p=0 mixes none, as it says
    assert "realised" not in caplog.text
    user = [Example("h", kind="harmful")] * 2 + [Example("t")] * 8
    assert attacks.get("harmful_mix").realised(run.attack, user) == {"p_realised": 0.2}
    run.attack.mode = "add"  # p*n harmful rows on top of n
    assert attacks.get("harmful_mix").realised(run.attack, user) == {"p_realised": 0.25}
    assert attacks.get("benign").realised(run.attack, user) == {}


# ---------------------------------------------------------------- sizes
@pytest.mark.parametrize("override,key", [
    ("alignment.size=0", "alignment.size"), ("alignment.size=-5", "alignment.size"),
    ("alignment.harmless_size=0", "alignment.harmless_size"),
    ("alignment.harmful_size=-1", "alignment.harmful_size"),
    ("task.train.limit=0", "task.train.limit"), ("attack.harmful.limit=-5", "attack.harmful.limit"),
    ("eval.harmful_size=0", "eval.harmful_size"), ("eval.task_size=-3", "eval.task_size"),
    ("attack.n=0", "attack.n"), ("attack.k=0", "attack.k"),
    ("world.align_size=0", "world.align_size"), ("world.task_pool_size=0", "world.task_pool_size"),
    ("world.eval_harmful_per_category=0", "world.eval_harmful_per_category")])
def test_no_size_a_stage_trains_or_scores_on_may_be_zero_or_negative(make_cfg, override, key):
    value = override.split("=")[1]
    with pytest.raises(ConfigError, match=rf"{key}(:| must be) .*{value}"):
        validate(make_cfg(override))


# ---------------------------------------------------------------- evaluation caps sample
def test_quotas_are_proportional_with_largest_remainders():
    from harness.data.sampling import quotas

    assert quotas({"a": 6, "b": 4}, 5) == {"a": 3, "b": 2}
    assert quotas({"a": 1, "b": 1, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}  # ties: first met
    assert quotas({"a": 7, "b": 2, "c": 1}, 4) == {"a": 3, "b": 1, "c": 0}  # 2.8, 0.8, 0.4


def test_a_cap_samples_every_category_and_ignores_the_run_seed(make_cfg, tmp_path):
    path = fx.jbb_sorted(tmp_path)  # 10 categories of 10, sorted by category
    cap = [*jbb_eval(path), "eval.harmful_size=20", "eval.task_size=50"]
    _, d0 = load(make_cfg, *cap, "seed=0")
    _, d1 = load(make_cfg, *cap, "seed=1")
    assert d0.eval_harmful == d1.eval_harmful and d0.task_test == d1.task_test
    assert len(d0.eval_harmful) == 20 and len(d0.task_test) == 50
    cats = [e.category for e in d0.eval_harmful]
    assert all(cats.count(c) == 2 for c in fx.JBB_CATEGORIES)  # the first 20 held 2 categories
    idx = [int(e.origin.split("line ")[1]) for e in d0.eval_harmful]
    assert idx == sorted(idx)  # the file's order
    _, other = load(make_cfg, *cap, "eval.sample_seed=1")
    assert other.eval_harmful != d0.eval_harmful
    _, whole = load(make_cfg, *jbb_eval(path), "eval.harmful_size=100")
    assert len(whole.eval_harmful) == 100  # a cap that covers the set keeps every row


def test_the_sample_seed_is_keyed_only_where_a_cap_chooses_rows(make_cfg, tmp_path):
    from harness.artifacts import artifact_key
    from harness.keys import eval_payload
    from harness.pipeline import Pipeline
    from harness.stages import ModelRef

    def eval_key(*o):
        pipe = Pipeline(validate(make_cfg(*o)), tmp_path)
        return artifact_key(eval_payload(pipe.inputs, ModelRef("final", "f")))

    assert eval_key() == eval_key("eval.sample_seed=3")
    assert eval_key("eval.harmful_size=50") != eval_key("eval.harmful_size=50",
                                                        "eval.sample_seed=3")


def test_inspect_shows_the_sample_the_run_scores(make_cfg, tmp_path):
    from harness.inspect import inspect_run

    path = fx.jbb_sorted(tmp_path)
    overrides = [*SMALL, *jbb_eval(path), "eval.harmful_size=20", "eval.task_size=30"]
    lines = []
    seen = inspect_run(validate(make_cfg(*overrides)), echo=lines.append)
    d = RunInputs(validate(make_cfg(*overrides))).load()
    assert seen["eval.harmful"] == d.eval_harmful and seen["task.test"] == d.task_test
    assert (f"  100 rows read, 20 kept; eval.harmful_size=20: a random sample of 20 of 100 rows "
            f"(eval.sample_seed=0, stratified by 10 categories)") in lines


# ---------------------------------------------------------------- value maps
def test_a_users_value_map_replaces_the_presets(make_cfg, tmp_path):
    from harness.keys import source_payload

    path = tmp_path / "ag.csv"
    path.write_text(fx.agnews_csv(tmp_path).read_text() + '"0","Stray row","zero class"\n')
    own = ["task=agnews", "task.train.source=local", f"task.train.path={path}",
           "task.train.header=false", "++task.train.fields={label: 0, input: [1, 2]}",
           "++task.train.values={label: {1: World, 2: Sports, 3: Business, 4: Sci/Tech}}",
           "task.train.split=:9"]
    run = validate(make_cfg(*own))
    assert run.task.train.value_map() == {"label": {1: "World", 2: "Sports", 3: "Business",
                                                    4: "Sci/Tech"}}
    from harness.data.sources import load_source

    with pytest.raises(DataError, match=r"ag\.csv, line 9, column 0: value '0' is not in the "
                                        r"value map task\.train\.values\.label"):
        load_source(run.task.train, required=("input", "label"))
    # the preset's map stays in force without one, and keys as it always did
    sst2 = validate(make_cfg("task=sst2"))
    assert sst2.task.train.value_map() == {"label": {"0": "negative", "1": "positive"}}
    payload = source_payload(sst2.task.train)
    assert payload["values"] == {"label": {"0": "negative", "1": "positive"}}
    assert "preset_values" not in payload


# ---------------------------------------------------------------- undefined rates
def test_a_filter_that_drops_nothing_has_no_precision_and_no_harm_no_recall():
    from harness.filtering import apply_filter

    rows = [Example("t", kind="task")] * 3 + [Example("h", kind="harmful")]
    _, s = apply_filter(rows, [0.1, 0.2, 0.3, 0.4], threshold=0.9)
    assert (s["n_dropped"], s["precision"], s["precision_undefined"]) == (0, None,
                                                                          "nothing dropped")
    assert (s["recall"], s["leakage"], s["harmless_dropped_share"]) == (0.0, 1.0, 0.0)
    _, s = apply_filter(rows[:3], [0.1, 0.95, 0.3], threshold=0.9)  # p = 0: no harmful row
    assert (s["precision"], s["recall"], s["leakage"]) == (0.0, None, None)
    assert s["recall_undefined"] == s["leakage_undefined"] == "no harmful rows in the upload"
    assert "precision_undefined" not in s
    _, s = apply_filter(rows[3:], [0.95], threshold=0.9)  # an all-harmful upload
    assert (s["precision"], s["recall"], s["harmless_dropped_share"]) == (1.0, 1.0, None)


def test_an_undefined_rate_is_a_dash_in_reports_not_a_missing_seed():
    import pandas as pd

    from harness.reporting.cells import build_cell
    from harness.reporting.tables import markdown_cell

    runs = pd.DataFrame([{"status": "ok", "seed": s, "path": f"r{s}", "filter_precision": v}
                         for s, v in ((0, None), (1, None))])
    cell = build_cell(runs, "ref_teacher", 0.1, "filter_precision", 2)
    assert (cell.mean, cell.n_undefined, cell.missing) == (None, 2, 0)
    assert markdown_cell(cell) == "—"
    runs.loc[0, "filter_precision"] = 80.0
    cell = build_cell(runs, "ref_teacher", 0.1, "filter_precision", 2)
    assert cell.mean == 80.0 and markdown_cell(cell).endswith("(1 seed(s) undefined)")
