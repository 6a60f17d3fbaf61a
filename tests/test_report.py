"""The sweep report on handmade results files: every cell carries an interval (over seeds, or
over prompts for one seed), comparisons are paired, failures are marked, plots are drawn."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from harness.report import collect, find_results, main, table_markdown
from harness.stats import outcome_digest, pack

N_HARM, N_TASK = 200, 100


def _outcomes(rate, n, rng):
    """0/1 outcomes with exactly round(rate * n / 100) ones, in a seeded order."""
    k = round(rate * n / 100)
    x = np.zeros(n, dtype=bool)
    x[rng.choice(n, k, replace=False)] = True
    return x


def _write(root, name, defense, p, seed, hs, fa, status="ok", hs_outcomes=None, attack=None,
           extra=None):
    rng = np.random.default_rng(hash((defense, p, seed)) % 2**32)
    d = root / name
    d.mkdir(parents=True)
    metrics = {}
    if status == "ok":
        h = _outcomes(hs, N_HARM, rng) if hs_outcomes is None else hs_outcomes
        t = _outcomes(fa, N_TASK, rng)
        metrics = {"final": {
            "hs": 100 * h.mean(), "fa": 100 * t.mean(), "refusal_rate": 100 - 100 * h.mean(),
            "other_rate": 0.0, "p_comply_opening": 100 * h.mean(), "n_harmful": N_HARM,
            "n_task": N_TASK,
            "outcomes": {"hs": pack(h), "fa": pack(t),
                         "hs_prompts": outcome_digest([f"h{seed}-{i}" for i in range(N_HARM)]),
                         "fa_prompts": outcome_digest([f"t{seed}-{i}" for i in range(N_TASK)])}}}
    d.joinpath("results.json").write_text(json.dumps({
        "status": status, "error": None if status == "ok" else "ValueError: boom\ntrace",
        "config": {"defense": {"name": defense}, "attack": {"p": p, "n": 1000, **(attack or {})},
                   "seed": seed, "torch_threads": 1, "task": {"name": "toy_sentiment"},
                   "model": {"name": "tiny_llama"}, **(extra or {})},
        "versions": {"git": "abc1234", "cpu_model": "Test CPU", "cpu_capability": "AVX2"},
        "metrics": metrics}))


@pytest.fixture
def sweep(tmp_path):
    """Three seeds; sft and a defense that halves HS at p=0.2 and matches sft at p=0.1."""
    for seed, (hs1, hs2) in enumerate([(40.0, 60.0), (50.0, 70.0), (45.0, 65.0)]):
        _write(tmp_path, f"sft-{seed}-1", "sft", 0.1, seed, hs=hs1, fa=90.0)
        _write(tmp_path, f"sft-{seed}-2", "sft", 0.2, seed, hs=hs2, fa=90.0)
        _write(tmp_path, f"def-{seed}-2", "good", 0.2, seed, hs=hs2 / 2, fa=90.0)
        _write(tmp_path, f"def-{seed}-1", "good", 0.1, seed, hs=hs1 + (1 if seed else -1),
               fa=90.0, status="failed" if seed == 2 else "ok")
    return tmp_path


def _section(md, heading):
    return md.split(f"## {heading}\n")[1].split("\n## ")[0]


def test_cells_are_mean_and_student_t_interval_over_seeds(sweep):
    df = collect(find_results([str(sweep)]))
    assert len(df) == 12
    half = stats.sem([40, 50, 45]) * stats.t.ppf(0.975, 2)  # 12.42
    table = table_markdown(df, "attack.p")
    sft_row = next(line for line in table.splitlines() if line.startswith("| sft |"))
    assert f"45.0 ± {half:.1f}" in sft_row
    # good at p=0.1: 2 of 3 seeds, one failed: marked, never a silent clean number
    good_row = next(line for line in table.splitlines() if line.startswith("| good |"))
    assert "⚠ 2/3 seeds (1 failed)" in good_row


def test_one_seed_cells_show_the_wilson_prompt_interval(tmp_path):
    _write(tmp_path, "a", "sft", 0.1, 0, hs=25.0, fa=90.0)
    _write(tmp_path, "b", "sft", 0.2, 0, hs=0.0, fa=100.0)
    main([str(tmp_path), "--out", str(tmp_path / "r")])
    md = (tmp_path / "r" / "report.md").read_text()
    ci = stats.binomtest(50, N_HARM).proportion_ci(0.95, method="wilson")
    assert f"25.0 [{100 * ci.low:.1f}, {100 * ci.high:.1f}]" in md  # 19.5, 31.4
    zero = stats.binomtest(0, N_HARM).proportion_ci(0.95, method="wilson")
    assert f"0.0 [0.0, {100 * zero.high:.1f}]" in md  # an interval even at 0%: 1.9
    assert "one seed only" in md and "nan" not in md.lower()
    assert "nan" not in (tmp_path / "r" / "report.html").read_text().lower()


def test_paired_difference_table_separates_real_and_null_differences(sweep):
    out = sweep / "report"
    main([str(sweep), "--out", str(out)])
    md = (out / "report.md").read_text()
    pair = _section(md, "HS (%): paired difference from sft")
    row = next(line for line in pair.splitlines() if line.startswith("| good |"))
    at_01, at_02 = row.split("|")[2], row.split("|")[3]
    assert "n.d." in at_01  # +-1 point over 2 seeds: not distinguishable
    diff = float(at_02.split()[0])
    assert diff == pytest.approx(-32.5, abs=0.01) and "n.d." not in at_02  # halved: real
    low, high = (float(x) for x in at_02.split("[")[1].split("]")[0].split(","))
    assert low < diff < high < 0
    # the best per column is bold; a defense the paired test cannot tell from it gets ≈
    hs = _section(md, "HS (%)")
    sft_row = next(line for line in hs.splitlines() if line.startswith("| sft |"))
    good_row = next(line for line in hs.splitlines() if line.startswith("| good |"))
    assert "**" in good_row.split("|")[3] and "≈" in sft_row.split("|")[2]
    assert "⚠ 2/3 seeds" in row.split("|")[2]  # the pairing says it had fewer seeds


def test_report_header_files_and_failed_runs(sweep, capsys):
    out = sweep / "report"
    main([str(sweep), "--out", str(out), "--title", "p sweep"])
    md = (out / "report.md").read_text()
    assert md.startswith("# p sweep")
    for fact in ("**seeds**: 3 (0, 1, 2)", "**torch threads**: 1", "**CPU**: Test CPU (AVX2)",
                 "**git**: abc1234", "**runs**: 12, 1 failed", "python -m harness.report"):
        assert fact in md, fact
    assert "ValueError: boom" in md.split("## Failed runs")[1]
    per_seed = _section(md, "HS (%): per seed")
    assert "| sft | s0 40.0, s1 50.0, s2 45.0 |" in per_seed and "s1 51.0, ✗" in per_seed
    assert (out / "hs_fa_vs_attack_p.png").stat().st_size > 5000
    page = (out / "report.html").read_text()
    assert page.count("<img") >= 2 and 'href="../sft-0-1/results.json"' in page
    assert "nan" not in md.lower() and "nan" not in page.lower()
    assert "report:" in capsys.readouterr().out


def test_a_point_whose_every_run_failed_keeps_its_column(tmp_path):
    _write(tmp_path, "a", "sft", 0.1, 0, hs=30.0, fa=90.0)
    _write(tmp_path, "b", "sft", 0.3, 0, hs=0, fa=0, status="failed")
    main([str(tmp_path), "--out", str(tmp_path / "r")])
    hs = _section((tmp_path / "r" / "report.md").read_text(), "HS (%)")
    assert "attack.p=0.3" in hs and "failed ⚠ 0/1 seeds (1 failed)" in hs


def test_no_results_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        main([str(tmp_path)])


def test_defense_as_the_axis_is_a_clear_error(sweep):
    # it used to crash in pandas (groupby on "defense" twice)
    with pytest.raises(SystemExit, match="--axis defense: defenses are already the rows"):
        main([str(sweep), "--axis", "defense"])


def test_pareto_front_and_plot(sweep):
    import pandas as pd

    from harness.reporting.plots import pareto_front
    points = pd.DataFrame({"defense": list("abcd"), "attack.p": [0.1] * 4,
                           "fa": [90.0, 95.0, 80.0, 95.0], "hs": [20.0, 30.0, 25.0, 40.0]})
    assert pareto_front(points)["defense"].tolist() == ["a", "b"]  # c and d are dominated
    out = sweep / "report"
    main([str(sweep), "--out", str(out)])
    assert (out / "pareto_hs_fa_by_attack_p.png").stat().st_size > 5000
    assert "pareto_hs_fa_by_attack_p.png" in (out / "report.md").read_text()


def test_refusal_and_other_tables(sweep):
    out = sweep / "report"
    main([str(sweep), "--out", str(out)])
    md = (out / "report.md").read_text()
    refusal = _section(md, "refusal (%)")
    half = stats.sem([60, 50, 55]) * stats.t.ppf(0.975, 2)
    assert f"55.0 ± {half:.1f}" in refusal  # refusal = 100 - hs here
    assert "other (%)" in md and not math.isnan(half)


def test_a_report_rebuilds_from_its_own_csv_without_nan(sweep):
    """Old studies keep only results.csv: the rebuilt report has no NaN, and cells whose prompt
    counts were never recorded say so instead of inventing an interval."""
    out = sweep / "report"
    main([str(sweep), "--out", str(out)])
    csv = sweep / "old.csv"
    import pandas as pd
    pd.read_csv(out / "results.csv").drop(columns=["n_harmful", "n_task"]).query(
        "seed == 0").to_csv(csv, index=False)
    main([str(csv), "--out", str(sweep / "again")])
    md = (sweep / "again" / "report.md").read_text()
    assert "nan" not in md.lower() and "(no interval)" in md


def test_a_csv_of_several_seeds_pairs_as_its_runs_did(sweep):
    """Two or more seeds pair by Student t over the per-seed differences, which needs only
    the per-seed values: a report rebuilt from results.csv (no per-prompt outcomes) gives the
    same paired-difference table as the runs themselves, where it once said "unpaired"."""
    import pandas as pd

    out, again = sweep / "report", sweep / "again"
    main([str(sweep), "--out", str(out)])
    csv = sweep / "old.csv"
    pd.read_csv(out / "results.csv").to_csv(csv, index=False)
    main([str(csv), "--out", str(again)])
    first, second = ((d / "report.md").read_text() for d in (out, again))
    section = "HS (%): paired difference from sft"
    assert "unpaired" not in _section(second, section)
    assert _section(first, section) == _section(second, section)
    assert "-32.5" in _section(second, section)


def test_a_cell_marks_seeds_whose_filter_dropped_the_whole_upload():
    import pandas as pd

    from harness.reporting.cells import build_cell
    from harness.reporting.tables import markdown_cell

    runs = pd.DataFrame({"status": ["ok", "ok"], "hs": [0.0, 13.4], "seed": [0, 1],
                         "path": ["a", "b"], "served_aligned": [True, False]})
    cell = build_cell(runs, "ref_teacher", 1.0, "hs", 2)
    assert cell.n_served_aligned == 1
    assert markdown_cell(cell).endswith("ⓐ 1/2 filtered whole")


def test_an_interrupted_run_is_told_from_a_failed_one(tmp_path):
    """An interrupted run resumes when its sweep is rerun; a failed one needs a fix: the
    header, the cell's flag and the listing say which."""
    _write(tmp_path, "a", "sft", 0.1, 0, hs=30.0, fa=90.0)
    _write(tmp_path, "b", "sft", 0.1, 1, hs=0, fa=0, status="interrupted")
    _write(tmp_path, "c", "sft", 0.3, 0, hs=0, fa=0, status="failed")
    main([str(tmp_path), "--out", str(tmp_path / "r")])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "**runs**: 3, 1 failed, 1 interrupted (rerun the sweep's command" in md
    hs = _section(md, "HS (%)")
    assert "⚠ 1/2 seeds (1 interrupted)" in hs and "failed ⚠ 0/2 seeds (1 failed, 1 missing)" in hs
    assert "`" + str(tmp_path / "b") + "`" in md.split("## Interrupted runs")[1]
    assert str(tmp_path / "b") not in md.split("## Failed runs")[1].split("## Interrupted")[0]


def test_runs_of_one_seed_that_differ_are_never_averaged(tmp_path):
    """An attacker's sweep (or a forgotten --axis) puts runs of one seed that differ in lr into
    one cell: the cell says so and names the leaf instead of a mean; the same run reported from
    two folders counts once."""
    for i, lr in enumerate((1e-4, 1e-3)):
        _write(tmp_path, f"sweep-{i}", "sft", 0.1, 0, hs=20.0 + 40 * i, fa=90.0,
               extra={"train": {"finetune": {"lr": lr}}})
    for folder in ("a", "b"):
        _write(tmp_path, f"{folder}/good", "good", 0.1, 0, hs=10.0, fa=90.0,
               extra={"train": {"finetune": {"lr": 1e-4}}})
    main([str(tmp_path), "--out", str(tmp_path / "r"), "--reference", "good"])
    hs = _section((tmp_path / "r" / "report.md").read_text(), "HS (%)")
    sft = next(line for line in hs.splitlines() if line.startswith("| sft |"))
    assert "mixed ⚠ 2 runs of 1 seed(s) differ in train.finetune.lr: give one as --axis" in sft
    good = next(line for line in hs.splitlines() if line.startswith("| good |"))
    assert "10.0 [" in good and "⚠" not in good  # one seed, counted once, its Wilson interval


def test_the_attack_axis_keeps_each_shot_count_apart(tmp_path):
    for k, hs in ((100, 80.0), (10, 20.0)):
        _write(tmp_path, f"k{k}", "sft", 0.0, 0, hs=hs, fa=0.0,
               attack={"name": "harmful_shots", "k": k})
    main([str(tmp_path), "--out", str(tmp_path / "r"), "--axis", "attack"])
    hs = _section((tmp_path / "r" / "report.md").read_text(), "HS (%)")
    assert hs.index("attack=harmful_shots k=10 ") < hs.index("attack=harmful_shots k=100")
    assert "20.0 [" in hs and "80.0 [" in hs and "mixed" not in hs


def test_a_report_of_only_mixed_cells_draws_no_empty_plot(tmp_path):
    """An attacker's sweep under --axis seed: every cell mixed, the report still writes (its
    worst-case section carries the numbers) and leaves out plots that would be empty."""
    for i, lr in enumerate((1e-4, 1e-3)):
        _write(tmp_path, f"t{i}", "sft", 0.1, 0, hs=20.0 + 40 * i, fa=90.0,
               extra={"train": {"finetune": {"lr": lr}}})
    main([str(tmp_path), "--out", str(tmp_path / "r"), "--axis", "seed"])
    assert "mixed" in (tmp_path / "r" / "report.md").read_text()
    assert not list((tmp_path / "r").glob("*.png"))
