"""The HTML report opens in a real headless browser (Debian's chromium) and renders its plots."""
import shutil
import subprocess

import pytest

from harness.report import main as report
from tests.helpers import HANG_S
from tests.test_report import sweep  # noqa: F401 - the handwritten results fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                "(apt-get install chromium; .ci/run installs it)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--allow-file-access-from-files", "--enable-logging=stderr", "--v=0"]


def test_html_report_renders_in_chromium(sweep, tmp_path):  # noqa: F811
    out = tmp_path / "report"
    report([str(sweep), "--out", str(out), "--title", "browser check"])
    url = (out / "report.html").as_uri()
    dom = subprocess.run([CHROMIUM, *FLAGS, "--dump-dom", url], capture_output=True, text=True,
                         timeout=HANG_S)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h1>browser check" in dom.stdout and dom.stdout.count("<img") >= 3
    assert "ERROR:CONSOLE" not in dom.stderr and "Uncaught" not in dom.stderr
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--screenshot={shot}", "--window-size=1200,1600", url],
                   capture_output=True, text=True, timeout=HANG_S, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
