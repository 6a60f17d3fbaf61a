"""Tokeniser, loss masking, padding, mixing and local data files."""
import json

import pytest
import torch

from harness.data.collate import IGNORE_INDEX, PadCollator, encode_example, left_pad
from harness.data.mixing import build_user_data
from harness.data.schema import DataError, Example
from harness.data.sources import load_source
from harness.data.templates import ALPACA, TemplateConfig
from harness.data.tokenizer import train_toy_tokenizer
from harness.data.toy import ToyWorld, ToyWorldConfig
from harness.config import DataSourceConfig


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


@pytest.mark.parametrize("template", [TemplateConfig(), ALPACA])
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
    with pytest.raises(DataError, match=r"task\.jsonl, row 2: not valid JSON"):
        load_source(DataSourceConfig(source="local", path=str(path)))


def test_missing_field_names_file_row_and_field(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_text("goal,target\nwrite x,Sure\n,Sure\n")
    cfg = DataSourceConfig(source="local", path=str(path), fields={"instruction": "goal"})
    with pytest.raises(DataError, match=r"advbench\.csv, row 3, field 'goal': empty"):
        load_source(cfg, required=("instruction",))


@pytest.mark.parametrize("name,content,msg", [("empty.jsonl", "", "no rows"),
                                              ("rows.txt", "x", "unknown file type"),
                                              ("missing.jsonl", None, "file not found")])
def test_unusable_files_fail_clearly(tmp_path, name, content, msg):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=msg):
        load_source(DataSourceConfig(source="local", path=str(path)))


def test_hub_dataset_offline_fails_at_once_with_advice():
    import time

    t0 = time.perf_counter()
    with pytest.raises(DataError, match="not cached.*source=local"):
        load_source(DataSourceConfig(source="hf", path="PKU-Alignment/BeaverTails",
                                     split="30k_test"))
    assert time.perf_counter() - t0 < 15  # no 20-50 s hub retry


def test_left_pad_dtype():
    ids, mask = left_pad([[1, 2]], 0)
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_a_list_valued_field_is_an_error_not_its_repr(tmp_path):
    """A JSON list in a text field used to train on the text "['positive']" (issue 22)."""
    path = tmp_path / "task.jsonl"
    path.write_text('{"instruction": "a", "output": "fine"}\n'
                    '{"instruction": "b", "output": ["positive"]}\n')
    with pytest.raises(DataError, match=r"task\.jsonl, row 2, field 'output': is a list"):
        load_source(DataSourceConfig(source="local", path=str(path)))
