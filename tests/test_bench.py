"""``make bench`` smoke test: one tiny repeat writes a table with every row."""
import json
import math

import pytest

from harness import bench


@pytest.mark.slow  # 42-74 s on 2 cores: every row's workload, once
def test_bench_smoke_writes_every_row(tmp_path):
    results = bench.main(["--sizes", "tiny", "--repeats", "1", "--overhead-repeats", "1",
                          "--steps", "2", "--warmup", "1", "--memory-steps", "2",
                          "--new-tokens", "4", "--finetune-steps", "2",
                          "--posthoc-repeats", "1", "--out", str(tmp_path)])
    rows = results["rows"]
    assert {r["row"] for r in rows} == {1, 2, 3, 4, 5, 6}
    whats = {r["what"] for r in rows}
    for m in bench.METHOD_ROWS:  # a step-cost row per reference (SFT, versus) and a memory row
        assert sum(r["what"].startswith(f"{m.name} ") for r in rows) == 2 + len(m.versus), m.name
    tv = next(r for r in rows if r["what"] == "t_vaccine step / vaccine step (full)")
    step = {r["what"].split(" ")[0]: r["ms"] for r in rows
            if r["row"] == 2 and "/ SFT step" in r["what"]}
    assert tv["ms"] == step["t_vaccine"] and tv["ref_ms"] == step["vaccine"]
    posthoc = [r for r in rows if r["row"] == 6]  # one per posthoc= method, on a 2-step finetune
    assert [r["what"].split(" ")[0] for r in posthoc] == [
        f"posthoc={m}" for m in bench.POSTHOC_METHODS] == ["posthoc=safelora", "posthoc=antidote"]
    for r in posthoc:
        assert r["unit"] == "x" and len(r["samples_ms"]) == len(r["ref_samples_ms"]) == 1
        assert r["value"] == pytest.approx(r["samples_ms"][0] / r["ref_samples_ms"][0])
        assert "(2 LoRA steps)" in r["what"]
    assert "300 calibration rows" in posthoc[1]["detail"]  # the bench world's harmful rows
    assert any("bare PyTorch loop" in w for w in whats)
    assert any("HF transformers.Trainer" in w for w in whats)
    assert any("judge throughput" in w for w in whats)
    for r in rows:
        if r["unit"] in ("x", "share", "answers/s"):
            assert math.isfinite(r["value"]) and r["value"] > 0, r
        if r["target"] is not None:
            assert isinstance(r["met"], bool), r
    sweep = next(r for r in rows if r["row"] == 4)
    assert sweep["points"] == 25 and sweep["with_reuse"]["finetune"] == 25
    assert sweep["with_reuse"]["base"] == 1 and sweep["naive"]["base"] == 25
    gen = next(r for r in rows if r["row"] == 3 and r["unit"] == "x")
    assert gen["identical_outputs"] is True
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") >= len(rows) + 1  # header plus one line per row
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(
        json.dumps(rows))


def test_posthoc_and_versus_rows_on_a_tiny_workload():
    """Row 6 and T-Vaccine / Vaccine alone, 1-2 steps: positive finite ratios, each the ratio
    of its own samples, with the post-hoc methods' stats in the detail."""
    from harness.bench.rows import bench_posthoc, bench_training
    from harness.bench.setup import make_setup, make_workload

    wl = make_workload(make_setup(), bench.SIZES["tiny"], 4)
    methods = [m for m in bench.METHOD_ROWS if m.name in ("vaccine", "t_vaccine")]
    rows, sec = bench_training(wl, warmup=1, steps=1, repeats=1, overhead_repeats=1,
                               methods=methods)
    tv = next(r for r in rows if r["what"] == "t_vaccine step / vaccine step (full)")
    assert tv["value"] == pytest.approx(sec["t_vaccine"] / sec["vaccine"])
    rows = bench_posthoc(wl, repeats=2, steps=2)
    assert [r["what"] for r in rows] == [
        f"posthoc={m} stage wall time / finetune stage wall time (2 LoRA steps)"
        for m in ("safelora", "antidote")]
    for r in [tv, *rows]:
        assert math.isfinite(r["value"]) and r["value"] > 0, r
    for r in rows:  # two repeats: the median of the two per-repeat ratios
        assert r["value"] == pytest.approx(sum(
            a / b for a, b in zip(r["samples_ms"], r["ref_samples_ms"])) / 2)
    assert rows[0]["params"] == {"mode": "threshold", "threshold": 0.5, "num_layers": 10}
    assert "of 28 LoRA modules" in rows[0]["detail"]  # 4 layers x 7 linear targets
    assert "300 calibration rows, pruned" in rows[1]["detail"]


# ============================================================== the GPU bench, in its CPU mode
def test_gpu_bench_cpu_mode_writes_each_row_and_caps_a_slow_one(tmp_path):
    """``--device cpu --tiny``: every row of the GPU bench at tiny shapes, each written with a
    number; the 1B SFT row under a cap it cannot meet is recorded as capped (its method rows
    are then not run) and the generation row after it still runs."""
    from harness.bench.gpu import GPU_METHODS

    results = bench.main(["--device", "cpu", "--tiny", "--out", str(tmp_path),
                          "--cap", "sft_1b=0.05"])
    rows = results["rows"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert [(r["name"], r["status"]) for r in rows] == (
        [("pipeline", "ok"), ("sft_7b", "ok"), ("sft_7b", "ok")]
        + [("method_7b", "ok")] * len(GPU_METHODS)
        + [("sft_1b", "capped"), ("generation_7b", "ok")])
    for r in rows:
        if r["status"] == "ok":
            assert math.isfinite(r["value"]) and r["value"] > 0, r
    assert rows[0]["value"] == 1.0 and rows[0]["inside_interval"]  # the same run, reused
    assert [r["checkpointing"] for r in rows[1:3]] == [False, True]
    for r in rows[1:3]:
        assert r["flops_per_step"] == pytest.approx(2 * 32 * (
            4 * r["n_linear"] + 6 * r["n_lora"] + 8 * 2 * 64 * 32))  # batch 2 x 32, tiny shape
        assert r["mfu"] is None and r["tflops"] > 0
    methods = [r for r in rows if r["name"] == "method_7b"]
    assert [r["what"].split(" ")[0] for r in methods] == GPU_METHODS
    assert all(r["peak_mib"] is not None for r in methods)
    capped = rows[-2]
    assert capped["value"] is None and capped["cap_s"] == 0.05 and capped["seconds"] < 5
    assert "over its 0.05 s cap" in capped["detail"]
    gen = rows[-1]
    assert gen["identical_share"] == 1.0 and gen["batched_tok_s"] > 0
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "**capped**" in table


def test_lora_step_flops_by_hand():
    """tokens x (4 N_linear + 6 N_lora + 8 L d s): 10 x (400 + 60 + 8*2*4*5) = 10 x 780."""
    from harness.bench.gpu import bf16_peak, lora_step_flops

    assert lora_step_flops(100, 10, layers=2, hidden=4, seq=5, tokens=10) == 7800
    assert bf16_peak("NVIDIA H100 80GB HBM3") == bf16_peak("NVIDIA H200") == 989e12
    assert bf16_peak("Tesla T4") is None


def test_a_row_past_its_cap_is_recorded_not_waited_for(tmp_path):
    """A row that never returns is stopped at its cap and recorded; the next row runs."""
    from harness.bench.gpu import Report

    def forever():
        while True:
            pass

    report = Report(tmp_path, {"device": "cpu", "tiny": True, "budget": 60, "warmup": 1,
                               "steps": 1}, budget=60)
    report.run("a", 1, "never returns", "-", 0.2, forever)
    report.run("b", 2, "returns", "-", 5, lambda: [{"value": 3.0, "unit": "x"}])
    report.run("c", 3, "fails", "-", 5, lambda: 1 / 0)
    assert [(r["name"], r["status"], r["value"]) for r in report.rows] == [
        ("a", "capped", None), ("b", "ok", 3.0), ("c", "error", None)]
    assert "ZeroDivisionError" in report.rows[2]["detail"]
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["value"] == 3.0
