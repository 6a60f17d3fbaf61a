"""Every committed report under experiments/ is what the current report code makes of the
results file committed beside it: rebuilt from its results.csv by the command its header
records, each table must read as committed. A number changed by hand in the file is caught."""
from pathlib import Path

import pandas as pd
import pytest

from harness.reporting.rebuild import RESULTS, differences

ROOT = Path(__file__).resolve().parents[1]
REPORTS = sorted(p.parent for p in (ROOT / "experiments").rglob("report.md"))


def test_every_committed_report_has_its_results_file():
    assert len(REPORTS) >= 30
    assert [r for r in REPORTS if not (r / RESULTS).is_file()] == []


@pytest.mark.parametrize("folder", REPORTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_committed_report_rebuilds_from_its_results_file(folder):
    assert differences(folder) == [], (
        f"rebuild it: python -m harness.reporting.rebuild {folder.relative_to(ROOT)} --write")


def test_a_number_changed_by_hand_is_caught(tmp_path):
    folder = ROOT / "experiments" / "toy_poison_ratio"
    df = pd.read_csv(folder / RESULTS, dtype={"hs_outcomes": str, "fa_outcomes": str})
    row = df.index[(df["defense"] == "lisa") & (df["attack.p"] == 0.1)][0]
    df.loc[row, "hs"] += 1.0
    tampered = tmp_path / RESULTS
    df.to_csv(tampered, index=False)
    changed = differences(folder, tampered)
    assert "HS (%)" in changed and "HS (%): per seed" in changed
