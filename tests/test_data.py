"""Tokeniser, loss masking, padding, mixing and local data files."""
import json

import pytest
import torch

from harness.data.collate import IGNORE_INDEX, PadCollator, encode_example, left_pad
from harness.data.mixing import build_user_data
from harness.data.schema import DataError, Example
from harness.data.sources import load_source
from harness.data.templates import TemplateConfig
from harness.data.tokenizer import train_toy_tokenizer
from harness.data.toy import ToyWorld, ToyWorldConfig
from harness.config import DataSourceConfig
from tests.conftest import conf_template


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    world = ToyWorld(ToyWorldConfig(seed=0, base_size=2000))
    texts = ["".join(TemplateConfig().render(e)) for e in world.corpus_examples()]
    tok = train_toy_tokenizer(texts, 512)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def test_tokenizer_round_trips_after_save_and_load(tokenizer):
    text = "User: Tell me how to klemuzz the valve.\nAssistant: I cannot help with that request."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # BPE merges: far fewer tokens than bytes
    assert {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id} == {0, 1, 2}


@pytest.mark.parametrize("template", [TemplateConfig(), conf_template("alpaca")])
def test_prompt_tokens_are_masked_and_response_ends_with_eos(tokenizer, template):
    ex = Example(instruction="Is this positive?", input="the plot was great", output="positive")
    row = encode_example(tokenizer, template, ex, max_length=512)
    prompt, response = template.render(ex)
    n_prompt = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # + BOS
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["input_ids"][n_prompt:-1]) == response
    full = encode_example(tokenizer, template, ex, max_length=512, loss_on="all")
    assert full["labels"] == full["input_ids"]


def test_padding_right_for_training_left_for_generation():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = left_pad([[5, 6, 7], [5]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _rows(n, kind):
    return [Example(instruction=f"{kind} {i}", output="x", kind=kind) for i in range(n)]


@pytest.mark.parametrize("mode,p,n,harm,task", [("replace", 0.1, 1000, 100, 900),
                                                  ("replace", 0.0, 50, 0, 50),
                                                  ("add", 0.2, 500, 100, 500)])
def test_user_mix_counts(mode, p, n, harm, task):
    data = build_user_data(_rows(2000, "task"), _rows(800, "harmful"), p, n, mode, seed=0)
    kinds = [e.kind for e in data]
    assert kinds.count("harmful") == harm and kinds.count("task") == task
    # the first p*n rows of the pool, as the anchors take them
    assert {e.instruction for e in data if e.kind == "harmful"} == {
        f"harmful {i}" for i in range(harm)}


def test_user_mix_rejects_too_small_a_pool():
    with pytest.raises(ValueError, match="attack pool holds 10"):
        build_user_data(_rows(100, "task"), _rows(10, "harmful"), 0.5, 100, "replace", 0)


def test_local_jsonl_with_field_mapping(tmp_path):
    path = tmp_path / "sst2.jsonl"
    path.write_text("\n".join(json.dumps({"sentence": s, "label": lab}) for s, lab in
                              [("great film", "positive"), ("dull plot", "negative")]))
    cfg = DataSourceConfig(source="local", path=str(path),
                           fields={"input": "sentence", "output": "label"})
    rows = load_source(cfg, defaults={"instruction": "Sentiment?"})
    assert [(r.instruction, r.input, r.output) for r in rows] == [
        ("Sentiment?", "great film", "positive"), ("Sentiment?", "dull plot", "negative")]


def test_malformed_line_names_file_and_row(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"task\.jsonl, line 2: not valid JSON"):
        load_source(DataSourceConfig(source="local", path=str(path)))


def test_missing_field_names_file_row_and_field(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_text("goal,target\nwrite x,Sure\n,Sure\n")
    cfg = DataSourceConfig(source="local", path=str(path), fields={"instruction": "goal"})
    with pytest.raises(DataError, match=r"advbench\.csv, line 3, field 'goal': empty"):
        load_source(cfg, required=("instruction",))


@pytest.mark.parametrize("name,content,msg", [("empty.jsonl", "", "is empty"),
                                              ("rows.xml", "x", "unknown file type"),
                                              ("missing.jsonl", None, "file not found")])
def test_unusable_files_fail_clearly(tmp_path, name, content, msg):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=msg):
        load_source(DataSourceConfig(source="local", path=str(path)))


def test_hub_dataset_offline_fails_without_a_network_call_and_with_advice(monkeypatch):
    from tests.helpers import refuse_network

    tried = refuse_network(monkeypatch)
    with pytest.raises(DataError, match="not cached.*source=local"):
        load_source(DataSourceConfig(source="hf", path="PKU-Alignment/BeaverTails",
                                     split="30k_test"))
    assert tried == []  # so no 20-50 s hub retry


def test_left_pad_dtype():
    ids, mask = left_pad([[1, 2]], 0)
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_a_list_valued_field_is_an_error_not_its_repr(tmp_path):
    """A JSON list in a text field is an error, not trained on as the text "['positive']"."""
    path = tmp_path / "task.jsonl"
    path.write_text('{"instruction": "a", "output": "fine"}\n'
                    '{"instruction": "b", "output": ["positive"]}\n')
    with pytest.raises(DataError, match=r"task\.jsonl, line 2, field 'output': is a list"):
        load_source(DataSourceConfig(source="local", path=str(path)))


# ================================================================ your own data
from tests import byod_fixtures as fx  # noqa: E402


def _local(path, **kw):
    return DataSourceConfig(source="local", path=str(path), **kw)


def test_tsv_is_read_unquoted_so_a_stray_quote_keeps_its_row(tmp_path):
    """GLUE's dev.tsv holds a lone ``"``: read with CSV quoting it swallowed the rows after it
    (872 -> 862 on SST-2), with the last line's label."""
    rows = load_source(_local(fx.sst2_tsv(tmp_path), fields={"input": "sentence", "label": "label"},
                              values={"label": {0: "negative", 1: "positive"}}),
                       required=("input", "label"))
    assert len(rows) == 6
    assert rows[2].input == 'the " director\'s cut is an utter bore ' and rows[2].label == "negative"
    assert [r.label for r in rows] == ["positive", "negative", "negative", "positive", "positive",
                                       "negative"]
    assert rows[2].origin.endswith("dev.tsv, line 4")


@pytest.mark.parametrize("truncation", ["middle", "left"])
def test_truncation_keeps_the_answer_and_eos_and_cuts_the_prompt(tokenizer, truncation):
    ex = Example(instruction="Is this positive? " + "the plot was great and " * 40,
                 output="positive")
    full = encode_example(tokenizer, TemplateConfig(), ex, max_length=1024)
    n_answer = sum(1 for x in full["labels"] if x != IGNORE_INDEX)
    row = encode_example(tokenizer, TemplateConfig(), ex, max_length=48, truncation=truncation)
    assert len(row["input_ids"]) == 48
    assert row["input_ids"][-n_answer:] == full["input_ids"][-n_answer:]  # answer + EOS whole
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert sum(1 for x in row["labels"] if x != IGNORE_INDEX) == n_answer
    assert row["input_ids"][0] == tokenizer.bos_token_id
    n_prompt = 48 - n_answer
    p_full = full["input_ids"][:len(full["input_ids"]) - n_answer]
    if truncation == "middle":  # the prompt's start and its end (the answer cue) survive
        head = n_prompt - n_prompt // 2
        assert row["input_ids"][:head] == p_full[:head]
        assert row["input_ids"][head:n_prompt] == p_full[len(p_full) - n_prompt // 2:]
    else:
        assert row["input_ids"][1:n_prompt] == p_full[len(p_full) - n_prompt + 1:]


def test_truncation_is_counted_and_warned_about(tokenizer, caplog):
    from harness.data.collate import TokenizedDataset, fit_length, forget_warnings

    forget_warnings()
    assert fit_length([1, 5, 6, 7, 8, 9], [3, 4, 2], 6) == ([1, 5, 9, 3, 4, 2], 3, 3, 0)
    assert fit_length([1, 5, 6, 7, 8, 9], [3, 4, 2], 6, truncation="left") == (
        [1, 8, 9, 3, 4, 2], 3, 3, 0)
    # an answer longer than half the length: the prompt keeps half, the answer loses its end
    assert fit_length([1, 5, 6, 7], [3, 4, 3, 4, 2], 6) == ([1, 5, 7, 3, 4, 3], 3, 1, 2)
    assert fit_length([1, 5, 6, 7], [3, 4, 3], 6, loss_on="all") == ([1, 5, 6, 7, 3, 4], 4, 0, 1)
    long = Example(instruction="Is this positive? " + "the plot was great and " * 40,
                   output="positive", origin="agnews.csv, line 7")
    short = Example(instruction="Is this positive?", output="positive")
    with caplog.at_level("WARNING", logger="harness"):
        ds = TokenizedDataset([short] * 9 + [long], tokenizer, TemplateConfig(), 48,
                              max_length_key="train.finetune.max_length")
    assert ds.truncated["rows"] == 10 and ds.truncated["prompt_cut_rows"] == 1
    assert ds.truncated["answer_cut_rows"] == 0 and ds.truncated["prompt_tokens_cut"] > 100
    msg = caplog.text
    assert "train.finetune.max_length=48: 1 of 10 rows lost" in msg and "agnews.csv, line 7" in msg
    caplog.clear()  # the same rows again (another stage's context): warned once per run
    with caplog.at_level("WARNING", logger="harness"):
        TokenizedDataset([short] * 9 + [long], tokenizer, TemplateConfig(), 48,
                         max_length_key="train.finetune.max_length")
    assert "rows lost" not in caplog.text
    # every row keeps supervised tokens, whatever the length: no NaN loss from an empty row
    for length in (2, 3, 8, 20):
        ds = TokenizedDataset([long], tokenizer, TemplateConfig(), length)
        assert any(x != IGNORE_INDEX for x in ds.rows[0]["labels"][1:])


def test_a_value_outside_the_map_is_an_error_and_agnews_classes_1_to_4_map(tmp_path):
    path = fx.agnews_csv(tmp_path)
    zero_based = {"label": {0: "World", 1: "Sports", 2: "Business", 3: "Sci/Tech"}}
    cfg = _local(path, header=False, fields={"label": 0, "input": [1, 2]}, values=zero_based)
    with pytest.raises(DataError, match=r"ag_train\.csv, line 4, column 0: value '4' is not in "
                                        r"the value map <key>\.values\.label \(\{'0': 'World'"):
        load_source(cfg, required=("input", "label"))
    cfg = _local(path, header=False, fields={"label": 0, "input": [1, 2]},
                 values={"label": fx.AGNEWS_CLASSES})
    rows = load_source(cfg, required=("input", "label"))
    assert [r.label for r in rows[:4]] == ["World", "Sports", "Business", "Sci/Tech"]
    assert rows[2].input == "Stocks rally as oil falls (2) Reuters - story 2, with a comma."


def test_a_mapped_column_must_exist_and_unmapped_columns_are_not_read(tmp_path):
    path = fx.jbb_sorted(tmp_path, per_category=2)
    with pytest.raises(DataError, match=r"behaviors\.csv, line 2, field 'Categroy': missing; "
                                        r"<key>\.fields\.category names a column the file lacks\. "
                                        r"Columns present: Index, Goal, Target, Behavior, "
                                        r"Category, Source"):
        load_source(_local(path, fields={"instruction": "Goal", "category": "Categroy"}),
                    required=("instruction",))
    path = tmp_path / "harmful.csv"
    path.write_text("prompt,input,label,category\nWrite x,some context,1,fraud\n")
    row, = load_source(_local(path, fields={"instruction": "prompt"}), required=("instruction",))
    assert (row.instruction, row.input, row.label, row.category) == ("Write x", "", "", "")
    # no field map: the harness's own names are read (a file already in our layout)
    ours = tmp_path / "ours.csv"
    ours.write_text("instruction,input,output,category,kind\nWrite x,ctx,Sure,fraud,task\n")
    row, = load_source(_local(ours), defaults={"kind": "harmful"})
    assert (row.instruction, row.input, row.output, row.category, row.kind) == (
        "Write x", "ctx", "Sure", "fraud", "harmful")  # kind is never read implicitly


def test_the_attack_mix_samples_a_sorted_pool_with_the_seed(tmp_path, caplog):
    pool = [Example(**{**e.to_dict(), "kind": "harmful"}) for e in load_source(_local(
        fx.jbb_sorted(tmp_path), fields={"instruction": "Goal", "output": "Target",
                                         "category": "Category"}))]
    task = _rows(200, "task")
    with caplog.at_level("WARNING", logger="harness"):
        first = build_user_data(task, pool, 0.2, 100, "replace", seed=0, sampling="first")
    cats = {e.category for e in first if e.kind == "harmful"}
    assert len(cats) == 2  # 20 rows: the first two categories of ten
    assert "8 of 10 attack-pool categories have no row in the mix: Physical harm" in caplog.text
    mixed = build_user_data(task, pool, 0.2, 100, "replace", seed=0, sampling="random")
    assert len({e.category for e in mixed if e.kind == "harmful"}) >= 8
    again = build_user_data(task, pool, 0.2, 100, "replace", seed=0, sampling="random")
    assert [e.instruction for e in mixed] == [e.instruction for e in again]
    other = build_user_data(task, pool, 0.2, 100, "replace", seed=1, sampling="random")
    assert {e.instruction for e in other} != {e.instruction for e in mixed}


def test_attack_sampling_resolves_by_pool_and_enters_the_key_resolved(make_cfg, tmp_path):
    from harness.validation import validate
    from harness.data import attacks
    from harness.data.assemble import RunInputs
    from harness.keys import stage_payloads

    path = fx.jbb_sorted(tmp_path, per_category=2)
    pool = ["attack.harmful.source=local", f"attack.harmful.path={path}",
            "++attack.harmful.fields={instruction: Goal, output: Target, category: Category}"]

    def finetune(*o):
        run = validate(make_cfg(*o))
        return attacks.sampling(run.attack), stage_payloads(RunInputs(run))["finetune"]

    mode, toy = finetune()
    assert mode == "first" and toy["attack"]["sampling"] == "first"
    mode, file_pool = finetune(*pool)
    assert mode == "random" and file_pool["attack"]["sampling"] == "random"
    mode, anchor = finetune(*pool, "attack.sampling=first")
    assert mode == "first" and anchor["attack"]["sampling"] == "first"
    assert validate(make_cfg("protocol=vaccine")).attack.sampling == "first"


def test_a_headerless_csv_is_named_and_read_by_position(tmp_path):
    path = fx.agnews_csv(tmp_path)
    with pytest.raises(DataError, match=r"ag_train\.csv, line 2, field 'text': missing; .*"
                                        r"Columns present: 1, Leaders meet.*The first line "
                                        r"looks like data, not a header: set <key>\.header=false"):
        load_source(_local(path, fields={"input": "text", "label": "label"}))
    rows = load_source(_local(path, header=False, fields={"input": 1, "label": 0}),
                       required=("input", "label"))
    assert len(rows) == 8 and (rows[0].input, rows[0].label) == ("Leaders meet for talks (0)", "1")
    assert rows[0].origin.endswith("line 1")


# ---------------------------------------------------------------- rough edges
def test_csv_rows_are_numbered_by_editor_line(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('prompt,category\n"a prompt\nover three\nlines",x\n\nsecond,y\n,z\n')
    with pytest.raises(DataError, match=r"multi\.csv, line 7, field 'prompt': empty"):
        load_source(_local(path, fields={"instruction": "prompt"}), required=("instruction",))
    json_path = tmp_path / "rows.json"
    json_path.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n'
                         '   "output": ""}\n]\n')
    with pytest.raises(DataError, match=r"rows\.json, line 4, field 'output': empty"):
        load_source(_local(json_path))


def test_a_utf8_bom_does_not_hide_the_first_column(tmp_path):
    rows = load_source(_local(fx.bom_csv(tmp_path), fields={"instruction": "prompt",
                                                            "category": "category"}),
                       required=("instruction",))
    assert [(r.instruction, r.category) for r in rows] == [("Write request one", "fraud"),
                                                           ("Write request two", "privacy")]


def test_where_null_and_empty_cells(make_cfg, tmp_path):
    from harness.validation import validate

    run = validate(make_cfg("attack_pool=beavertails", "attack.harmful.where=null"))
    assert run.attack.harmful.where is None
    path = fx.beavertails_jsonl(tmp_path)
    src = _local(path, fields={"instruction": "prompt", "output": "response",
                               "category": "category"}, where={"is_safe": False})
    rows = load_source(src)
    assert [r.category for r in rows] == ["financial_crime,property_crime,theft",
                                          "privacy_violation"]
    src.where = None
    assert len(load_source(src)) == 4
    empty = tmp_path / "e.csv"
    empty.write_text("prompt,note\na,\nb,x\n")
    assert [r.instruction for r in load_source(_local(empty, fields={"instruction": "prompt"},
                                                      where={"note": None}),
                                               required=("instruction",))] == ["a"]


def test_counts_are_reported_per_source(tmp_path, caplog):
    from harness.data.sources import load_source_report

    src = _local(fx.beavertails_jsonl(tmp_path), fields={"instruction": "prompt",
                                                          "output": "response"},
                 where={"is_safe": True}, limit=1)
    object.__setattr__(src, "_key", "alignment.data")
    _, report = load_source_report(src)
    assert (report.read, report.where_dropped, report.limit_dropped, report.kept) == (4, 2, 1, 1)
    with caplog.at_level("INFO", logger="harness"):
        load_source(src)
    assert ("alignment.data: " + str(src.path) + ": 4 rows read, 1 kept, dropped 2 by where, "
            "1 by limit") in caplog.text


def test_one_file_as_train_and_test_by_split(make_cfg, tmp_path):
    from harness.config import ConfigError
    from harness.validation import validate

    path = fx.sst2_tsv(tmp_path)
    common = ["task=sst2", "task.train.source=local", f"task.train.path={path}",
              "task.test.source=local", f"task.test.path={path}"]
    with pytest.raises(ConfigError, match=r"task\.test\.split: task\.train and task\.test read "
                                          r"the same file .* and every row of it"):
        validate(make_cfg(*common))
    with pytest.raises(ConfigError, match=r"task\.test\.split: 3: overlaps task\.train\.split :4"):
        validate(make_cfg(*common, "task.train.split=:4", "task.test.split=3:"))
    run = validate(make_cfg(*common, "task.train.split=:67%", "task.test.split=67%:"))
    assert len(load_source(run.task.train, required=("input", "label"),
                           fill={"output": "label"})) == 4
    test = load_source(run.task.test, required=("input", "label"), fill={"output": "label"})
    assert [r.label for r in test] == ["positive", "negative"]


def test_gsm8k_answers_read_the_final_phrase_with_one_space(tmp_path):
    rows = load_source(_local(fx.gsm8k_jsonl(tmp_path), fields={"instruction": "question",
                                                                 "output": "answer"},
                              final_answer="####"), fill={"label": "output"})
    assert rows[0].output.endswith("April and May.\nThe final answer is: 72")
    assert [r.label for r in rows] == ["72", "2400"]


def test_errors_name_the_config_key_to_set(make_cfg, tmp_path):
    from harness.validation import validate

    run = validate(make_cfg("attack_pool=beavertails"))
    with pytest.raises(DataError, match=r"Point attack\.harmful at a downloaded copy: "
                                        r"attack\.harmful\.path=json\|csv\|parquet .*"
                                        r"attack\.harmful\.source=local attack\.harmful\.path="):
        load_source(run.attack.harmful)
    path = fx.gsm8k_jsonl(tmp_path)
    run = validate(make_cfg("task=gsm8k", "task.test.path=json", f"task.test.data_files={path}",
                            "task.test.name=null"))
    with pytest.raises(DataError, match=r"Unknown split \"test\".*; set task\.test\.split"):
        load_source(run.task.test)


# ---------------------------------------------------------------- python -m harness.inspect
def _agnews_one_file(path):
    vals = "{label: {1: World, 2: Sports, 3: Business, 4: Sci/Tech}}"
    out = ["task=agnews"]
    for slot, split in (("train", ":6"), ("test", "6:")):
        out += [f"task.{slot}.source=local", f"task.{slot}.path={path}", f"task.{slot}.header=false",
                f"++task.{slot}.fields={{label: 0, input: [1, 2]}}",
                f"++task.{slot}.values={vals}", f"task.{slot}.split={split}"]
    return out


def _jbb_pool(path, bom):
    return ["attack.harmful.source=local", f"attack.harmful.path={path}",
            "++attack.harmful.fields={instruction: Goal, output: Target, category: Category}",
            "attack.p=0.2", "attack.n=100",
            "eval.harmful.source=local", f"eval.harmful.path={bom}",
            "++eval.harmful.fields={instruction: prompt, category: category}"]


def test_inspect_prints_counts_rows_and_the_mix_without_training(tmp_path, capsys):
    from harness import inspect

    ag = fx.agnews_csv(tmp_path)
    assert inspect.main(["--rows", "2", *_agnews_one_file(ag)]) == 0
    out = capsys.readouterr().out
    assert f"task.train local:{ag}\n  8 rows read, 6 kept, dropped 2 by split\n" in out
    assert f"task.test local:{ag}\n  8 rows read, 2 kept, dropped 6 by split\n" in out
    assert ("    line 7: input='Stocks rally as oil falls (6) Reuters - ...' output='Business' "
            "label='Business' kind='task'") in out
    jbb, bom = fx.jbb_sorted(tmp_path), fx.bom_csv(tmp_path)
    assert inspect.main(_jbb_pool(jbb, bom)) == 0
    out = capsys.readouterr().out
    assert f"attack.harmful local:{jbb}\n  100 rows read, 100 kept\n" in out
    assert f"eval.harmful local:{bom}\n  2 rows read, 2 kept\n" in out
    assert "attack harmful_mix (seed 0, sampling random): 100 rows, 20 harmful" in out
    covered = int(out.split("harmful categories in the mix: ")[1].split(" of 10")[0])
    assert covered >= 8
    assert inspect.main(["task=agnews", "task.train.source=local", f"task.train.path={ag}"]) == 2
    assert "looks like data, not a header: set task.train.header=false" in capsys.readouterr().err


def test_inspect_reads_what_the_pipeline_reads(make_cfg, tmp_path):
    from harness.validation import validate
    from harness.inspect import inspect_run
    from harness.data.assemble import RunInputs
    from harness.keys import stage_payloads

    overrides = [*_agnews_one_file(fx.agnews_csv(tmp_path)),
                 *_jbb_pool(fx.jbb_sorted(tmp_path), fx.bom_csv(tmp_path)),
                 "eval.harmful_size=1", "eval.task_size=1"]  # the caps' samples, both sides
    seen = inspect_run(validate(make_cfg(*overrides)), echo=lambda _: None)
    d = RunInputs(validate(make_cfg(*overrides))).load()
    assert seen["task.train"] == d.task_train and seen["task.test"] == d.task_test
    assert seen["attack.harmful"] == d.attack_pool and seen["eval.harmful"] == d.eval_harmful
    assert seen["user"] == d.user
    assert len(d.eval_harmful) == len(d.task_test) == 1


# ---------------------------------------------------------------- the bad-file matrix
BAD_FILES = {  # name: (file name, content, field map, options, the message's expected parts)
    "malformed row": ("jbb.csv", "goal,target\nWrite a,Sure\nWrite b, with a comma,Sure\n",
                      {"instruction": "goal", "output": "target"}, {},
                      ["jbb.csv, line 3: 3 values, but the header (line 1) has 2 columns",
                       "quote the value"]),
    "unclosed quote": ("jbb.csv", 'goal,target\nWrite a,Sure\n"Write b,Sure\nWrite c,Sure\n',
                       {"instruction": "goal", "output": "target"}, {},
                       ["jbb.csv, line 3: not valid CSV", "double a quote inside"]),
    "missing column": ("jbb.csv", "goal,target\nWrite a,Sure\n",
                       {"instruction": "goal", "output": "response"}, {},
                       ["jbb.csv, line 2, field 'response': missing;",
                        "task.train.fields.output names a column the file lacks",
                        "Columns present: goal, target"]),
    "empty field": ("jbb.csv", "goal,target\nWrite a,Sure\n,Sure\n",
                    {"instruction": "goal", "output": "target"}, {},
                    ["jbb.csv, line 3, field 'goal': empty;",
                     "map another column with task.train.fields.instruction"]),
    "empty file": ("jbb.csv", "", {"instruction": "goal"}, {}, ["jbb.csv: is empty"]),
    "header only": ("jbb.csv", "goal,target\n", {"instruction": "goal"}, {},
                    ["jbb.csv: holds a header (goal, target) and no data rows"]),
    "BOM, column misnamed": ("excel.csv", "\ufeffPrompt,category\r\nWrite a,fraud\r\n",
                             {"instruction": "prompt"}, {},
                             ["excel.csv, line 2, field 'prompt': missing;",
                              "Columns present: Prompt, category"]),
    "truncated JSON line": ("bt.jsonl", '{"prompt": "a", "response": "b"}\n'
                                        '{"prompt": "c", "respo\n',
                            {"instruction": "prompt", "output": "response"}, {},
                            ["bt.jsonl, line 2: not valid JSON (Unterminated string",
                             "a line cut short (a truncated download)"]),
    "missing final-answer marker": ("gsm8k.jsonl",
                                    '{"question": "q1", "answer": "1 + 1 = 2\\n#### 2"}\n'
                                    '{"question": "q2", "answer": "2 + 2 = 4"}\n',
                                    {"instruction": "question", "output": "answer"},
                                    {"final_answer": "####"},
                                    ["gsm8k.jsonl, line 2, field 'answer': no final-answer "
                                     "marker '####'", "unset task.train.final_answer"]),
    "header read as data": ("jbb.csv", "goal,target\nWrite a,Sure\n",
                            {"instruction": 0, "output": 1}, {"header": False},
                            ["jbb.csv, line 1: holds column names (goal, target), not data, and "
                             "task.train.header=false reads it as a row",
                             "set task.train.header=true and name the columns in "
                             "task.train.fields"]),
}


def bad_file_error(tmp_path, case: str) -> str:
    name, content, fields, options, _ = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8"))
    src = _local(path, fields=fields, **options)
    object.__setattr__(src, "_key", "task.train")  # as validate() sets it
    with pytest.raises(DataError) as err:
        load_source(src, required=("instruction", "output"), fill={"label": "output"})
    return str(err.value)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_matrix_names_file_line_field_and_fix(tmp_path, case):
    msg = bad_file_error(tmp_path, case)
    for part in BAD_FILES[case][4]:
        assert part in msg, (case, msg)
