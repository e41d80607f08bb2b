"""The Data Docs render fully offline in headless Chromium: styles applied, scripts run, no CDN.

Chromium is Debian's ``chromium`` package, installed by ``scripts/ensure-chromium`` (run by
``make test``). The test fails, never skips, when it is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--allow-file-access-from-files", "--hide-scrollbars"]


def _chromium() -> str:
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed: run scripts/ensure-chromium (make test does)"
    return exe


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           "--virtual-time-budget=8000", *args],
                          capture_output=True, text=True, timeout=180)


def _dom(page: Path, tmp: Path) -> str:
    proc = _run(["--dump-dom", page.as_uri()], tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _screenshot(page: Path, tmp: Path, name: str):
    from PIL import Image

    out = tmp / f"{name}.png"
    proc = _run([f"--screenshot={out}", "--window-size=1280,900", page.as_uri()], tmp)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]
    return Image.open(out).convert("RGB")


@pytest.fixture(scope="module")
def reports(ingested_5k) -> Path:
    """The Data Docs of the 5k population's ingest (the session's shared, read-only workspace)."""
    return ingested_5k[0] / "reports" / "quality" / "data_docs"


def test_index_page_renders_offline_with_every_suite(reports, tmp_path):
    index = reports / "index.html"
    dom = _dom(index, tmp_path)
    for suite in ("education", "benefits", "earnings"):
        assert suite in dom
    # nothing the page loads points at the internet
    assert not re.findall(r'<(?:link|script|img)\b[^>]*\b(?:href|src)="https?://', dom)
    # the scripts ran: bootstrap-table (jQuery plugin) wraps the index tables in its own markup
    assert 'class="bootstrap-table' in dom
    assert "fixed-table-body" in dom


def test_validation_page_renders_offline(reports, tmp_path):
    pages = sorted((reports / "validations").rglob("*.html"))
    assert len(pages) == 3
    page = next(p for p in pages if "earnings" in str(p))
    dom = _dom(page, tmp_path)
    assert "Expectation Suite:" in dom and "earnings" in dom and "record_id" in dom
    assert not re.findall(r'<(?:link|script|img)\b[^>]*\b(?:href|src)="https?://', dom)
    assert "NINO has the HMRC format" in dom           # the suite's own wording reaches the auditor


def test_styles_are_applied(reports, tmp_path):
    """The styled page differs from the same page stripped of its stylesheets, and shows Bootstrap's look."""
    index = reports / "index.html"
    bare = reports / "index_unstyled.html"
    bare.write_text(re.sub(r"<link\b[^>]*stylesheet[^>]*>", "", index.read_text()))
    styled, unstyled = _screenshot(index, tmp_path, "styled"), _screenshot(bare, tmp_path, "unstyled")
    bare.unlink()
    assert styled.size == unstyled.size == (1280, 900)
    from PIL import ImageChops

    diff = ImageChops.difference(styled, unstyled).convert("L").point(lambda x: 255 if x else 0).histogram()[255]
    assert diff > 0.05 * 1280 * 900, f"styles made almost no difference ({diff} pixels)"
    colours = styled.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20          # not a blank page
    # GX's navbar/card styling puts non-white, non-black colour on the page
    tinted = sum(n for n, (r, g, b) in colours if max(r, g, b) - min(r, g, b) > 30)
    assert tinted > 500
