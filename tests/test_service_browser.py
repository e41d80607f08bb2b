"""The portal in a real browser: Playwright drives Debian's headless Chromium against
``hhlink serve`` (uvicorn, in a subprocess, on a loopback port).

A researcher signs in, browses the catalogue, opens the transition matrix, builds a
table and sees its suppressed cells marked; an auditor opens the linkage-quality report
and checks the audit log. Chromium is ``/usr/bin/chromium`` (``scripts/ensure-chromium``);
Playwright never downloads a browser. The test fails, never skips, when it is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from playwright.sync_api import sync_playwright

from tests.conftest import PORTAL_KEY_HEX


def _chromium() -> str:
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed: run scripts/ensure-chromium (make test does)"
    return exe


def _env() -> dict:
    return {**os.environ, "HHLINK_KEY": PORTAL_KEY_HEX}


def _cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "linkage.cli", *args], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def portal(portal_workspace):
    ws = str(portal_workspace)
    tokens = {role: _cli("users", "add", f"web-{role}", "--role", role, "--workspace", ws).strip().splitlines()[-1]
              for role in ("researcher", "auditor")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "linkage.cli", "serve", "--workspace", ws, "--port", str(port)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the portal did not start within 60 s"
            time.sleep(0.3)
    yield base, tokens
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    for token in tokens.values():
        assert token not in err


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _watch(page) -> list[str]:
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


def _sign_in(page, token: str) -> None:
    assert "/login" in page.url
    page.fill("#token", token)
    page.click("form.login button[type=submit]")
    page.wait_for_load_state()


LABELS_FIT = """[...document.querySelectorAll('svg.chart')].every(svg => {
    const box = svg.getBoundingClientRect();
    return [...svg.querySelectorAll('text.value')].every(t => t.getBoundingClientRect().right <= box.right + 1);
})"""


def test_researcher_browses_the_catalogue_and_builds_a_table(portal, browser, portal_workspace, tmp_path):
    base, tokens = portal
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = _watch(page)
    page.goto(f"{base}/catalogue")
    _sign_in(page, tokens["researcher"])
    assert page.url == f"{base}/catalogue"
    rows = page.locator("table.catalogue tbody tr")
    published = (portal_workspace / "published" / "index.json").read_text()
    assert rows.count() == published.count('"', 0) // 2 - 1       # one row per table in index.json
    # a table page a researcher can read: the FSM gap by region on an axis that spans the data, paged rows
    page.click("text=KS4 attainment by ever on free school meals")
    assert page.url.endswith("/catalogue/attainment_fsm_ever_la")
    assert page.evaluate("document.body.scrollHeight") < 5000
    assert page.locator("svg.chart g.legend-item").all_text_contents() == ["no", "yes"]
    assert page.locator("svg.chart text.tick").first.text_content() != "0"
    assert page.locator("table.rows tbody tr").count() == 50
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    # every value label fits inside its chart (none is cut off at the right edge)
    assert page.evaluate(LABELS_FIT)
    page.click("nav.pager >> text=next")
    assert "Rows 51–100" in page.inner_text("nav.pager")
    page.screenshot(path=str(tmp_path / "attainment.png"), full_page=True)
    # the mobility table's bars carry intervals, n and reliability: the longest labels still fit
    page.goto(f"{base}/catalogue/mobility_la_cohort")
    assert page.locator("svg.chart g.interval").count() > 0 and page.evaluate(LABELS_FIT)
    page.goto(f"{base}/catalogue/attainment_fsm_ever_la")
    page.click("nav.crumbs >> text=Published tables")
    page.click("text=Quintile transition matrices by region")
    assert page.url.endswith("/catalogue/transition_region")
    heat = page.locator("table.heat")
    assert heat.is_visible()
    assert page.locator(".heat-legend .swatch").count() >= 10
    assert page.locator("table.heat td.suppressed").count() > 0        # suppressed cells are marked in the matrix
    assert page.locator("table.heat td.suppressed").first.inner_text().strip() == "✕"
    with page.expect_download() as dl:
        page.click("p.downloads >> text=CSV")
    path = tmp_path / "t.csv"
    dl.value.save_as(path)
    assert path.read_text().startswith("region,parent_income_quintile,child_income_quintile,measure,value,status")

    page.click("nav >> text=Table builder")
    assert "Requests today: 0 of" in page.inner_text("p.quota")
    page.check("input[name=dimensions][value=region]")
    page.check("input[name=dimensions][value=parent_income_quintile]")
    page.select_option("#measure", "mean_pay_25_30")
    page.click("form.builder button[type=submit]")
    page.wait_for_selector("section.result")
    decisions = page.inner_text("p.decisions")
    assert re.search(r"[1-9]\d* suppressed \(marked", decisions)
    marked = page.locator("section.result table.rows td.suppressed")
    assert marked.count() > 0 and "suppressed" in marked.first.inner_text()
    # a marked cell shows no number; its status says why
    row = page.locator("section.result table.rows tr.suppressed-row").first
    assert row.locator("td.status").inner_text().startswith("suppressed")
    assert page.locator("section.result table.heat").is_visible()
    # the data dictionary sits beside the result, not below it
    main, aside = (page.locator(sel).bounding_box() for sel in (".result-main", "aside.result-dictionary"))
    assert aside["x"] > main["x"] + main["width"] - 1 and abs(aside["y"] - main["y"]) < 50
    assert "Requests today: 1 of" in page.inner_text("p.quota")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280      # nothing runs off the page
    page.screenshot(path=str(tmp_path / "builder.png"), full_page=True)
    # the result's rows are paged like a table's, without a new request
    page.click("section.result nav.pager >> text=next")
    assert "Rows 51–100" in page.inner_text("section.result nav.pager")
    assert "Requests today: 1 of" in page.inner_text("p.quota")
    assert page.locator("aside.result-dictionary").is_visible()
    assert not problems, problems            # no script errors, no Content-Security-Policy violations


def test_auditor_opens_the_linkage_quality_report_and_the_audit_log(portal, browser):
    base, tokens = portal
    context = browser.new_context()
    page = context.new_page()
    problems = _watch(page)
    page.goto(f"{base}/reports")
    _sign_in(page, tokens["auditor"])
    assert page.url == f"{base}/reports"
    page.locator("tr", has_text="Linkage quality").locator("text=open").click()
    page.wait_for_load_state()
    assert page.url == f"{base}/reports/linkage/"
    assert "linkage-quality report" in page.title()
    assert page.locator("h2").count() >= 3 and "Blocking" in page.content()
    # the report carries the portal's navigation back to the other reports and the audit log
    assert page.locator("nav.hhlink-portal-nav").is_visible()
    page.click("nav.hhlink-portal-nav >> text=All reports")
    assert page.url == f"{base}/reports"
    page.goto(f"{base}/reports/linkage/")
    # the data-quality Data Docs run their vendored scripts under the reports' policy, offline
    page.goto(f"{base}/reports/quality/")
    page.wait_for_selector(".bootstrap-table", timeout=15_000)
    assert "education" in page.content()
    page.goto(f"{base}/audit")
    # the auditor's own report views are in the log (this visit to the log shows up next time)
    page.select_option("select[name=user]", "web-auditor")
    page.select_option("select[name=action]", "report.view")
    page.click("form.audit-filter button[type=submit]")
    newest = [page.locator("table.audit tbody tr").nth(i).inner_text() for i in range(2)]
    assert all("web-auditor" in row and "report.view" in row for row in newest), newest
    assert "report quality" in newest[0] and "report linkage" in newest[1]
    assert "127.0.0.1" in newest[0]
    assert page.evaluate("document.documentElement.scrollWidth") <= page.viewport_size["width"]
    page.click("text=Check the log's integrity")
    assert "entries intact" in page.inner_text("p[role=status]")
    assert not problems, problems
    # the auditor's role does not open the researchers' pages
    assert page.goto(f"{base}/builder").status == 403
    context.close()


def test_a_forged_forwarded_for_header_changes_neither_the_audited_nor_the_throttled_address(portal, portal_workspace):
    """Behind no proxy, the client address audited and throttled is the connection's: uvicorn's proxy headers
    are off, so a guesser cannot pose as another address (nor spread its guesses over many)."""
    import json

    base, _ = portal
    for i in range(3):
        req = urllib.request.Request(f"{base}/api/me", headers={"Authorization": f"Bearer hhl_{i:012x}_" + "Q" * 43,
                                                                 "X-Forwarded-For": f"203.0.113.{i}",
                                                                 "Forwarded": f"for=198.51.100.{i}"})
        try:
            urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as e:
            assert e.code == 401
            assert e.headers["content-security-policy"] and e.headers["x-content-type-options"] == "nosniff"
    lines = (portal_workspace / "audit" / "log.jsonl").read_text().splitlines()
    failed = [json.loads(x) for x in lines[-200:] if '"auth.failed"' in x and "QQQQ" not in x]
    mine = [e for e in failed if e["params"].get("token_id", "").startswith("000000000")]
    assert mine and all(e["params"]["client"] == "127.0.0.1" for e in mine)
    assert "203.0.113" not in "\n".join(lines[-200:]) and "198.51.100" not in "\n".join(lines[-200:])
