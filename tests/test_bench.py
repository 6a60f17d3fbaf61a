"""``make bench`` smoke test: one tiny repeat writes a table with every row."""
import json
import math

from harness import bench


def test_bench_smoke_writes_every_row(tmp_path):
    results = bench.main(["--sizes", "tiny", "--repeats", "1", "--overhead-repeats", "1",
                          "--steps", "2", "--warmup", "1", "--memory-steps", "2",
                          "--new-tokens", "4", "--out", str(tmp_path)])
    rows = results["rows"]
    assert {r["row"] for r in rows} == {1, 2, 3, 4, 5}
    whats = {r["what"] for r in rows}
    for m in bench.METHOD_ROWS:  # one step-cost row and one memory row per method
        assert sum(r["what"].startswith(f"{m.name} ") for r in rows) == 2, m.name
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
