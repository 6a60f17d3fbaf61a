"""The sweep report on handmade results files: numbers in cells, failures listed, plots drawn."""
import json

import pytest

from harness.report import collect, find_results, main, table_markdown


def _write(root, name, defense, p, seed, hs, fa, status="ok"):
    d = root / name
    d.mkdir(parents=True)
    metrics = {"final": {"hs": hs, "fa": fa, "refusal_rate": 100 - hs, "other_rate": 0.0,
                         "p_comply_opening": hs}} if status == "ok" else {}
    d.joinpath("results.json").write_text(json.dumps({
        "status": status, "error": None if status == "ok" else "ValueError: boom\ntrace",
        "config": {"defense": {"name": defense}, "attack": {"p": p, "n": 1000}, "seed": seed,
                   "task": {"name": "toy_sentiment"}, "model": {"name": "tiny_llama"}},
        "metrics": metrics}))


@pytest.fixture
def sweep(tmp_path):
    _write(tmp_path, "0", "sft", 0.1, 0, hs=40.0, fa=90.0)
    _write(tmp_path, "1", "sft", 0.1, 1, hs=60.0, fa=94.0)
    _write(tmp_path, "2", "sft", 0.2, 0, hs=70.0, fa=88.0)
    _write(tmp_path, "3", "none", 0.1, 0, hs=95.0, fa=92.0)
    _write(tmp_path, "4", "none", 0.2, 0, hs=0, fa=0, status="failed")
    return tmp_path


def test_cells_are_mean_and_std_over_seeds(sweep):
    df = collect(find_results([str(sweep)]))
    assert len(df) == 5
    table = table_markdown(df, "attack.p")
    assert "| sft | 50.0 ± 14.1 / 92.0 ± 2.8 | 70.0 / 88.0 |" in table
    assert "| none | 95.0 / 92.0 | — |" in table


def test_report_files_and_failed_runs(sweep, capsys):
    out = sweep / "report"
    main([str(sweep), "--out", str(out), "--title", "p sweep"])
    md = (out / "report.md").read_text()
    assert md.startswith("# p sweep") and "5 runs, 1 failed" in md
    assert "ValueError: boom" in md
    assert (out / "hs_fa_vs_attack_p.png").stat().st_size > 5000
    assert (out / "report.html").read_text().count("<img") >= 1
    assert "report:" in capsys.readouterr().out


def test_no_results_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        main([str(tmp_path)])


def test_pareto_front_and_plot(sweep):
    import pandas as pd

    from harness.report import pareto_front
    points = pd.DataFrame({"defense": list("abcd"), "attack.p": [0.1] * 4,
                           "fa": [90.0, 95.0, 80.0, 95.0], "hs": [20.0, 30.0, 25.0, 40.0]})
    assert pareto_front(points)["defense"].tolist() == ["a", "b"]  # c and d are dominated
    out = sweep / "report"
    main([str(sweep), "--out", str(out)])
    assert (out / "pareto_hs_fa_by_attack_p.png").stat().st_size > 5000
    assert "pareto_hs_fa_by_attack_p.png" in (out / "report.md").read_text()


def test_refusal_and_other_table(sweep):
    out = sweep / "report"
    main([str(sweep), "--out", str(out)])
    md = (out / "report.md").read_text()
    assert "Refusal / other" in md
    assert "| sft | 50.0 ± 14.1 / 0.0 ± 0.0 | 30.0 / 0.0 |" in md  # refusal = 100 - hs here
