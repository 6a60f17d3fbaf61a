"""Ref-Teacher's diagnostic figures (``python -m harness.diagnostics``): the per-prompt cosine
against torch's cosine of a layer's features, the cosines' means against the run's recorded
refusal separation, the SNR series read back against results.json, and the gradient-conflict
analysis switched on for SFT leaving the trained weights as they were."""
import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from harness.analysis.refusal import features
from harness.analysis.separation import prompt_cosines, separation_cosines
from harness.data.collate import prompt_ids
from harness.data.tokenizer import train_toy_tokenizer
from harness.diagnostics import SNR_KEY, SNR_SWITCH, main
from harness.run import execute
from tests.conftest import CONF
from tests.helpers import TINY, tiny_llama

PROMPTS = [f"User: how do I {verb} the {thing}\nAssistant:" for verb in ("zorp", "paint")
           for thing in ("vault", "fence", "boat")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return train_toy_tokenizer(PROMPTS * 3, vocab_size=200)


def test_prompt_cosines_are_torch_cosines_of_the_layers_last_prompt_token(tokenizer):
    """One prompt at a time, unpadded, by hand: hidden_states[layer] at the last token, against
    a hand-made direction; batched with padding (batch 4 of 6 rows), the function agrees."""
    model = tiny_llama(len(tokenizer), seed=3).eval()
    direction = torch.zeros(32)
    direction[0], direction[5] = 1.0, -2.0
    layer = 1
    with torch.no_grad():
        by_hand = torch.stack([
            model(input_ids=torch.tensor([prompt_ids(tokenizer, p)]),
                  output_hidden_states=True).hidden_states[layer][0, -1] for p in PROMPTS])
    expected = torch.nn.functional.cosine_similarity(by_hand, direction.unsqueeze(0), dim=1)
    got = prompt_cosines(model, tokenizer, PROMPTS, layer, direction, batch_size=4)
    assert got.shape == (len(PROMPTS),)
    assert torch.allclose(got, expected, atol=1e-5)
    # the same number written out: (f_0 - 2 f_5) / (|f| sqrt(5))
    f = by_hand[2]
    assert float(got[2]) == pytest.approx(float((f[0] - 2 * f[5]) / (f.norm() * 5 ** 0.5)),
                                          abs=1e-5)


def test_separation_cosines_use_the_held_sets_mean_difference(tokenizer):
    model = tiny_llama(len(tokenizer), seed=4).eval()
    harmful, harmless = PROMPTS[:3], PROMPTS[3:]
    direction, cosines = separation_cosines(model, tokenizer, harmful, harmless,
                                            {"all": PROMPTS}, layer=2, batch_size=2)
    feats = features(model, tokenizer, PROMPTS, 2, batch_size=6)
    assert torch.allclose(direction, feats[:3].mean(0) - feats[3:].mean(0), atol=1e-5)
    assert torch.allclose(cosines["all"],
                          torch.nn.functional.cosine_similarity(feats, direction[None], dim=1),
                          atol=1e-5)


# ================================================================ on tiny runs
# LoRA dropout makes every forward pass draw random numbers: the analysis's extra passes would
# shift the training's draws unless it keeps them apart
DROPOUT = "train.finetune.lora.dropout=0.1"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnostics")
    out = {}
    for name, every in (("analysed", 1), ("plain", 0)):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[
                *TINY, DROPOUT, "eval.stages=[base,align,final]", "attack.p=0.3",
                f"{SNR_SWITCH}={every}", f"paths.artifacts={root / 'artifacts'}"])
        run_dir = root / name
        run_dir.mkdir()
        out[name] = (execute(cfg, run_dir), run_dir)
    return out


def _adapter(results):
    return load_file(Path(results["artifacts"]["finetune"]["path"]) / "adapter"
                     / "adapter_model.safetensors")


def test_the_analysis_on_sft_leaves_the_trained_weights_as_they_were(runs):
    """It is part of the finetune's key (the artifact holds its history), yet the adapter is
    bit for bit the one trained without it, under dropout."""
    analysed, plain = runs["analysed"][0], runs["plain"][0]
    assert len(analysed["metrics"]["analysis"][SNR_KEY]) == 3  # steps 0, 1, 2
    assert "analysis" not in plain["metrics"]
    assert analysed["artifacts"]["finetune"]["key"] != plain["artifacts"]["finetune"]["key"]
    a, b = _adapter(analysed), _adapter(plain)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)


def _png_has_content(path: Path) -> None:
    import matplotlib.image

    assert path.stat().st_size > 5000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert float(pixels.std()) > 0.01  # not one flat colour


def test_figures_and_their_data_match_the_run(runs, tmp_path, capsys):
    results, run_dir = runs["analysed"]
    out = tmp_path / "diag"
    main([str(run_dir), "--out", str(out)])
    _png_has_content(out / "snr_over_steps.png")
    _png_has_content(out / "refusal_cosines.png")

    with open(out / "snr_over_steps.csv") as f:
        rows = list(csv.DictReader(f))
    series = results["metrics"]["analysis"][SNR_KEY]
    assert [int(r["step"]) for r in rows] == [p["step"] for p in series]
    for row, point in zip(rows, series):
        assert float(row["grad_snr"]) == point["grad_snr"]  # csv writes repr: exact
        assert float(row["grad_cosine_user_alignment"]) == point["grad_cosine_user_alignment"]
        assert row["run"] == "sft p=0.3 seed=0"

    data = json.loads((out / "refusal_cosines.json").read_text())
    assert [m["stage"] for m in data["models"]] == ["base", "align"]
    for m in data["models"]:
        recorded = results["metrics"][m["stage"]]["refusal_separation"]
        assert m["recorded_refusal_separation"] == recorded
        assert m["layer"] == recorded["layer"]
        harmful = torch.tensor(m["cosines"]["harmful"], dtype=torch.float64)
        harmless = torch.tensor(m["cosines"]["harmless"], dtype=torch.float64)
        assert len(harmful) == 16  # eval.harmful_size in TINY
        assert float(harmful.mean()) == pytest.approx(recorded["cos_harmful"], abs=1e-6)
        assert float(harmless.mean()) == pytest.approx(recorded["cos_harmless"], abs=1e-6)
        assert m["summary"]["harmful"]["mean"] == pytest.approx(float(harmful.mean()))
        assert len(m["cosines"]["task"]) == 8  # eval.task_size in TINY
        assert all(-1.0 <= c <= 1.0 for values in m["cosines"].values() for c in values)
    assert [len(data["prompts"][k]) for k in ("harmful", "harmless", "task")] == \
        [len(data["models"][0]["cosines"][k]) for k in ("harmful", "harmless", "task")]
    assert "base: harmful mean" in capsys.readouterr().out


def test_two_runs_share_their_base_and_each_adds_its_align(runs, tmp_path):
    """Both runs hold the same base and align (same key): each model is measured once."""
    out = tmp_path / "both"
    main([str(runs["analysed"][1]), str(runs["plain"][1]), "--out", str(out), "--only",
          "cosines"])
    data = json.loads((out / "refusal_cosines.json").read_text())
    assert [m["label"] for m in data["models"]] == ["base", "align: SFT"]
    assert not (out / "snr_over_steps.png").exists()


def test_a_run_without_the_series_names_the_key_and_the_override(runs, tmp_path):
    with pytest.raises(SystemExit) as err:
        main([str(runs["plain"][1]), "--out", str(tmp_path / "x"), "--only", "snr"])
    message = str(err.value)
    assert f"metrics.analysis.{SNR_KEY}" in message
    assert f"{SNR_SWITCH}=N" in message and f"{SNR_SWITCH}=0" in message
