"""The portal (``hhlink serve``, ``linkage/serve/``) on a real 2,000-person workspace.

Roles on every API route and page (missing, wrong and wrong-role credentials), CSRF on
every form, strict table requests (SQL and path tricks refused before any data is read),
the daily quota, answers that are exactly the disclosure engine's, no record-level data or
key in any response, token hashes only, the audit log's hash chain (edit, removal,
reordering and truncation each reported at the first bad entry), the CLI, and a bounded
schemathesis run against the OpenAPI spec that finds no server error.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading

import duckdb
import pandas as pd
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from linkage.config import load_config
from linkage.disclose.stage import build_table, record_key_secret
from linkage.keys import MasterKey
from linkage.serve import ROLES, AuditLog, UserStore, create_app
from linkage.serve.audit import AUDIT_KEY_PURPOSE, entry_hash
from tests.conftest import PORTAL_KEY_HEX, QUARANTINE_MARKER

KEY = MasterKey(bytes.fromhex(PORTAL_KEY_HEX), "test")
ALL = set(ROLES)

#: every API route and the roles it admits; a route missing here fails test_every_route_is_covered
API = {
    ("GET", "/api/me"): ALL,
    ("GET", "/api/tables"): {"researcher"},
    ("GET", "/api/tables/{name}"): {"researcher"},
    ("GET", "/api/tables/{name}/data"): {"researcher"},
    ("POST", "/api/builder"): {"researcher"},
    ("GET", "/api/builder/quota"): {"researcher"},
    ("GET", "/api/builder/results/{name}"): {"researcher"},
    ("GET", "/api/reports"): {"auditor", "engineer"},
    ("GET", "/api/reports/{name}"): {"auditor", "engineer"},
    ("GET", "/api/audit"): {"auditor"},
    ("GET", "/api/audit/verify"): {"auditor"},
    ("GET", "/api/runs"): {"engineer"},
    ("GET", "/api/quarantine"): {"engineer"},
}
API_URL = {"/api/tables/{name}": "/api/tables/transition_region",
           "/api/tables/{name}/data": "/api/tables/transition_region/data?format=csv",
           "/api/builder/results/{name}": "/api/builder/results/request_000000000000",
           "/api/reports/{name}": "/api/reports/linkage"}
#: every page (GET) and the roles it admits; the form posts are tested with CSRF below
PAGES = {
    "/catalogue": {"researcher"},
    "/catalogue/{name}": {"researcher"},
    "/catalogue/{name}/download": {"researcher"},
    "/builder": {"researcher"},
    "/builder/results/{name}": {"researcher"},
    "/reports": {"auditor", "engineer"},
    "/reports/summary/{name}.json": {"auditor", "engineer"},
    "/reports/{report}": {"auditor", "engineer"},
    "/reports/{report}/{path:path}": {"auditor", "engineer"},
    "/audit": {"auditor"},
    "/audit/verify": {"auditor"},
    "/runs": {"engineer"},
    "/quarantine": {"engineer"},
}
PAGE_URL = {"/catalogue/{name}": "/catalogue/transition_region",
            "/catalogue/{name}/download": "/catalogue/transition_region/download?format=csv",
            "/builder/results/{name}": "/builder/results/request_000000000000?format=csv",
            "/reports/summary/{name}.json": "/reports/summary/linkage.json",
            "/reports/{report}": "/reports/linkage",
            "/reports/{report}/{path:path}": "/reports/linkage/report.html"}
PUBLIC = {"/", "/healthz", "/favicon.ico", "/login", "/logout", "/openapi.json", "/static"}


@pytest.fixture(scope="module")
def ws(portal_workspace):
    return portal_workspace


@pytest.fixture(scope="module")
def tokens(ws) -> dict[str, str]:
    store = UserStore(ws)
    return {role: store.add(f"svc-{role}", role) for role in ROLES}


@pytest.fixture(scope="module")
def app(ws, tokens):
    return create_app(ws, load_config(), key=KEY)


@pytest.fixture(scope="module")
def api(app):
    with TestClient(app) as client:
        yield client


def _bearer(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _call(client, method: str, path: str, headers: dict):
    url = API_URL.get(path, path)
    if method == "POST":
        return client.post(url, json={"dimensions": ["region"], "measure": "count"}, headers=headers)
    return client.get(url, headers=headers)


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def _login(app, token: str) -> tuple[TestClient, str]:
    client = TestClient(app, follow_redirects=False)
    form = client.get("/login")
    r = client.post("/login", data={"token": token, "csrf": _csrf(form.text), "next": ""})
    assert r.status_code == 303, r.text
    page = client.get(r.headers["location"])
    return client, _csrf(page.text)


@pytest.fixture(scope="module")
def sessions(app, tokens) -> dict[str, tuple[TestClient, str]]:
    return {role: _login(app, tokens[role]) for role in ROLES}


# -- roles on every route -----------------------------------------------------------------------

def test_every_route_is_covered(app):
    spec = app.openapi()
    declared = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert declared == set(API)
    for p, ops in spec["paths"].items():
        for op in ops.values():
            assert op.get("security") == [{"HTTPBearer": []}], p
    from linkage.serve import pages as page_routes

    assert {r.path for r in page_routes.router.routes} - PUBLIC == set(PAGES)


@pytest.mark.parametrize("method,path", sorted(API))
def test_api_route_refuses_missing_wrong_and_wrong_role_tokens(api, tokens, method, path):
    real = tokens["researcher"]
    wrong = [None, "nonsense", "hhl_000000000000_" + "A" * 43, real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")]
    for token in wrong:
        r = _call(api, method, path, _bearer(token))
        assert r.status_code == 401, (path, token and token[:8], r.status_code)
        assert r.headers.get("www-authenticate") == "Bearer"
    r = _call(api, method, path, {"Authorization": f"Basic {base64.b64encode(b'a:b').decode()}"})
    assert r.status_code == 401
    for role in ROLES:
        r = _call(api, method, path, _bearer(tokens[role]))
        if role in API[(method, path)]:
            assert r.status_code not in (401, 403) and r.status_code < 500, (path, role, r.text[:200])
        else:
            assert r.status_code == 403, (path, role, r.status_code)
            assert "detail" in r.json()


def test_wrong_role_is_audited(api, tokens, ws):
    api.get("/api/runs", headers=_bearer(tokens["researcher"]))
    entries, _ = AuditLog(ws, KEY).entries(0, 5, newest_first=True)
    denied = next(e for e in entries if e["action"] == "access.denied")
    assert denied["actor"] == "svc-researcher" and denied["params"]["path"] == "/api/runs"
    assert denied["outcome"] == "denied"


@pytest.mark.parametrize("path", sorted(PAGES))
def test_page_refuses_missing_wrong_and_wrong_role_sessions(app, sessions, path):
    url = PAGE_URL.get(path, path)
    anonymous = TestClient(app, follow_redirects=False)
    r = anonymous.get(url)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    anonymous.cookies.set("hhlink_session", "forged-" + "x" * 40)
    r = anonymous.get(url)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    for role in ROLES:
        client, _ = sessions[role]
        r = client.get(url)
        if role in PAGES[path]:
            # admitted: a result never requested is not found; a report's folder redirects to its index
            want = 404 if "results" in path else 307 if path == "/reports/{report}" else 200
            assert r.status_code == want, (path, role, r.status_code)
        else:
            assert r.status_code == 403, (path, role, r.status_code)


def test_bearer_token_does_not_open_pages_and_cookie_does_not_open_api(app, tokens, sessions):
    r = TestClient(app, follow_redirects=False).get("/catalogue", headers=_bearer(tokens["researcher"]))
    assert r.status_code == 303
    client, _ = sessions["researcher"]
    assert client.get("/api/tables").status_code == 401


def test_session_ends_when_user_is_removed_or_token_rotated(app, ws):
    store = UserStore(ws)
    token = store.add("svc-leaver", "researcher")
    client, _ = _login(app, token)
    assert client.get("/catalogue").status_code == 200
    new = store.rotate("svc-leaver")
    assert client.get("/catalogue").status_code == 303
    client, _ = _login(app, new)
    store.remove("svc-leaver")
    assert client.get("/catalogue").status_code == 303
    with TestClient(app) as api:
        assert api.get("/api/me", headers=_bearer(new)).status_code == 401


# -- sessions and CSRF -----------------------------------------------------------------------------

def test_session_cookie_is_httponly_strict_and_not_the_token(app, tokens):
    client = TestClient(app, follow_redirects=False)
    form = client.get("/login")
    r = client.post("/login", data={"token": tokens["auditor"], "csrf": _csrf(form.text), "next": "/audit"})
    assert r.status_code == 303 and r.headers["location"] == "/audit"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("hhlink_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert tokens["auditor"] not in cookie and tokens["auditor"][4:16] not in cookie


def test_login_refuses_bad_tokens_and_foreign_redirects(app, tokens):
    client = TestClient(app, follow_redirects=False)
    form = client.get("/login")
    r = client.post("/login", data={"token": tokens["researcher"][:-1] + "Z", "csrf": _csrf(form.text), "next": ""})
    assert r.status_code == 401 and "not valid" in r.text and "hhlink_session" not in r.headers.get("set-cookie", "")
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "/\t/evil.example", "/%0a/x//y"):
        form = client.get("/login")
        r = client.post("/login", data={"token": tokens["researcher"], "csrf": _csrf(form.text), "next": target})
        assert r.status_code == 303 and r.headers["location"] == "/catalogue"


def test_forms_refuse_missing_and_wrong_csrf(app, tokens, sessions):
    fresh = TestClient(app, follow_redirects=False)
    fresh.get("/login")
    assert fresh.post("/login", data={"token": tokens["researcher"]}).status_code == 403
    assert fresh.post("/login", data={"token": tokens["researcher"], "csrf": "guess"}).status_code == 403
    other = TestClient(app, follow_redirects=False)      # a form from another browser: its cookie is not ours
    stolen = _csrf(other.get("/login").text)
    assert fresh.post("/login", data={"token": tokens["researcher"], "csrf": stolen}).status_code == 403

    client, csrf = sessions["researcher"]
    used = client.get("/api/builder/quota")  # cookies do not open the API
    assert used.status_code == 401
    form = {"dimensions": ["region"], "measure": "count"}
    assert client.post("/builder", data=form).status_code == 403
    assert client.post("/builder", data={**form, "csrf": "wrong"}).status_code == 403
    _, auditor_csrf = sessions["auditor"]
    assert client.post("/builder", data={**form, "csrf": auditor_csrf}).status_code == 403
    r = client.post("/builder", data={**form, "csrf": csrf})
    assert r.status_code == 200 and "cells:" in r.text
    assert client.post("/logout", data={}).status_code == 403
    assert client.get("/catalogue").status_code == 200       # still signed in


def test_logout_ends_the_session(app, tokens):
    client, csrf = _login(app, tokens["engineer"])
    r = client.post("/logout", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/runs").status_code == 303


def test_pages_send_security_headers(sessions):
    client, _ = sessions["researcher"]
    r = client.get("/catalogue")
    assert "script-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"


# -- table builder -------------------------------------------------------------------------------

TRICKS = [
    {"dimensions": ["region; DROP TABLE cohort"], "measure": "count"},
    {"dimensions": ["region' OR '1'='1"], "measure": "count"},
    {"dimensions": ["region"], "measure": "count) from read_parquet('research/cohort.parquet') --"},
    {"dimensions": ["../../research/cohort.parquet"], "measure": "count"},
    {"dimensions": ["/etc/passwd"], "measure": "count"},
    {"dimensions": ["child"], "measure": "count"},
    {"dimensions": ["region"], "measure": "max(adult_pay)"},
    {"dimensions": ["region"], "measure": "count", "filter": "la = 'E06000001'"},
    {"dimensions": ["region"], "measure": "count", "where": {"child_id": "x"}},
    {"dimensions": "region", "measure": "count"},
    {"dimensions": [["region"]], "measure": "count"},
    {"dimensions": [{"$ne": None}], "measure": "count"},
    {"dimensions": ["region", "region"], "measure": "count"},
    {"dimensions": ["region", "sex", "cohort", "fsm_ever"], "measure": "count"},
    {"dimensions": [], "measure": "count"},
    {"dimensions": ["la", "cohort", "ethnicity"], "measure": "count"},      # over service.max_cells
    {"dimensions": ["REGION"], "measure": "count"},
    {"dimensions": ["region\u0000"], "measure": "count"},
    [],
    "region",
    None,
]


@pytest.mark.parametrize("body", TRICKS, ids=[f"trick{i}" for i in range(len(TRICKS))])
def test_builder_refuses_sql_path_and_shape_tricks(api, tokens, ws, body):
    user = tokens["researcher"]
    before = api.get("/api/builder/quota", headers=_bearer(user)).json()["used"]
    r = api.post("/api/builder", json=body, headers=_bearer(user))
    assert r.status_code == 422, (body, r.status_code, r.text[:200])
    assert "Traceback" not in r.text and "duckdb" not in r.text.lower()
    assert api.get("/api/builder/quota", headers=_bearer(user)).json()["used"] == before
    last = AuditLog(ws, KEY).entries(0, 3, newest_first=True)[0]
    refused = next(e for e in last if e["action"] == "builder.request")
    assert refused["outcome"] == "refused" and refused["detail"]["quota_counted"] is False


def test_builder_refuses_bodies_that_are_not_json_or_too_large(api, tokens):
    h = {**_bearer(tokens["researcher"]), "Content-Type": "application/json"}
    assert api.post("/api/builder", content=b"{not json", headers=h).status_code == 422
    big = json.dumps({"dimensions": ["region"] * 2000, "measure": "count"})
    assert api.post("/api/builder", content=big, headers=h).status_code == 413


def test_table_names_and_report_paths_cannot_leave_their_folders(api, tokens, sessions):
    h = _bearer(tokens["researcher"])
    for url in ("/api/tables/..%2F..%2Fresearch%2Fcohort/data", "/api/tables/cohort/data", "/api/tables/index/data",
                "/api/tables/COHORT", "/api/tables/x.parquet/data", "/api/tables/transition_region/data?format=parquet"):
        assert api.get(url, headers=h).status_code in (404, 422), url
    client, _ = sessions["auditor"]
    for url in ("/reports/quality/../../research/cohort.parquet", "/reports/quality/%2e%2e/%2e%2e/staged/manifest.json",
                "/reports/quality/static/../../../../../research/cohort.parquet", "/reports/linkage/%2Fetc%2Fpasswd",
                "/reports/quality/.hidden", "/reports/linkage/report.json.bak", "/reports/research/cohort.parquet",
                "/reports/summary/mobility.json", "/reports/quality/..%2F..%2F..%2Fquarantine%2Feducation.parquet"):
        r = client.get(url)
        assert r.status_code == 404, (url, r.status_code)


def test_builder_answer_is_the_disclosure_engines_and_is_audited(api, tokens, ws):
    req = {"dimensions": ["sex", "region"], "measure": "mean_pay_25_30"}
    r = api.post("/api/builder", json=req, headers=_bearer(tokens["researcher"]))
    assert r.status_code == 200, r.text
    doc = r.json()
    engine = build_table({"dimensions": ["region", "sex"], "measure": "mean_pay_25_30"}, ws, load_config(), key=KEY)
    got = pd.DataFrame(doc["rows"])[list(engine.frame.columns)]
    want = engine.frame.astype({c: str for c in ("region", "sex")}).reset_index(drop=True)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_dtype=False)
    hidden = got["status"].str.startswith("suppressed")
    assert hidden.any() and got.loc[hidden, "value"].isna().all()
    assert set(got["status"]) <= {"perturbed", "suppressed_primary", "suppressed_secondary"}
    counts = got[(got["measure"] == "children") & ~hidden]
    assert (counts["value"] >= 10).all()
    assert doc["disclosure"]["suppressed_cells"] == engine.metadata["sdc"]["suppressed_cells"]
    entry = next(e for e in AuditLog(ws, KEY).entries(0, 5, newest_first=True)[0]
                 if e["action"] == "builder.request" and e["outcome"] == "ok")
    assert entry["params"]["request"] == {"dimensions": ["region", "sex"], "measure": "mean_pay_25_30"}
    dec = entry["detail"]["disclosure"]
    assert dec["suppressed_cells"] == engine.metadata["sdc"]["suppressed_cells"]
    assert dec["status_rows"]["suppressed_primary"] == int((engine.frame["status"] == "suppressed_primary").sum())
    # counts, never values: no released value of the table appears in the entry
    text = json.dumps(entry)
    for v in got.loc[~hidden & (got["measure"] == "mean_pay_25_30"), "value"]:
        assert f"{v:g}" not in text and str(v) not in text
    again = api.post("/api/builder", json=req, headers=_bearer(tokens["researcher"])).json()
    assert again["cached"] and again["rows"] == doc["rows"]
    down = api.get(f"/api/builder/results/{doc['table']}?format=csv", headers=_bearer(tokens["researcher"]))
    assert down.status_code == 200 and down.text.startswith("region,sex,measure,value,status")
    # another researcher cannot fetch it without asking (and spending quota) themselves
    assert api.get(f"/api/builder/results/{doc['table']}",
                   headers=_bearer(UserStore(ws).add("svc-other", "researcher"))).status_code == 404


def test_builder_page_marks_suppressed_cells(sessions):
    client, csrf = sessions["researcher"]
    r = client.post("/builder", data={"csrf": csrf, "dimensions": ["region", "parent_income_quintile"],
                                      "measure": "count"})
    assert r.status_code == 200
    assert r.text.count("✕ suppressed") > 0 and 'class="suppressed"' in r.text
    n = re.search(r"(\d+) suppressed as primary,\s+(\d+) as secondary", r.text)
    assert n and int(n.group(1)) + int(n.group(2)) > 0


def test_daily_quota(ws):
    cfg = load_config(service={"daily_quota": 2})
    token = UserStore(ws).add("svc-quota", "researcher")
    h = _bearer(token)
    with TestClient(create_app(ws, cfg, key=KEY)) as client:
        assert client.post("/api/builder", json={"dimensions": ["bogus"]}, headers=h).status_code == 422  # not counted
        for used, dims in ((1, ["sex"]), (2, ["fsm_ever"])):
            r = client.post("/api/builder", json={"dimensions": dims, "measure": "count"}, headers=h)
            assert r.status_code == 200 and r.json()["quota"]["used"] == used
        r = client.post("/api/builder", json={"dimensions": ["sex"], "measure": "count"}, headers=h)
        assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 86401
        assert client.get("/api/builder/quota", headers=h).json()["remaining"] == 0
    # the audit log is the record: a restarted service still counts today's requests
    with TestClient(create_app(ws, cfg, key=KEY)) as client:
        r = client.post("/api/builder", json={"dimensions": ["sex"], "measure": "count"}, headers=h)
        assert r.status_code == 429


def test_builder_without_research_tables_or_with_broken_ones(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    token = UserStore(ws).add("svc-early", "researcher")
    with TestClient(create_app(ws, load_config(), key=KEY)) as client:
        r = client.post("/api/builder", json={"dimensions": ["sex"], "measure": "count"}, headers=_bearer(token))
        assert r.status_code == 503 and "assemble" in r.json()["detail"]
        (ws / "research").mkdir()
        for name in ("cohort", "person"):
            (ws / "research" / f"{name}.parquet").write_bytes(b"PAR1 not really parquet " + name.encode())
        r = client.post("/api/builder", json={"dimensions": ["sex"], "measure": "count"}, headers=_bearer(token))
        assert r.status_code == 500 and r.json()["detail"].startswith("the table could not be built")
        assert "parquet" not in r.text.lower() and "duckdb" not in r.text.lower()
        assert client.get("/api/builder/quota", headers=_bearer(token)).json()["used"] == 0
    failed = AuditLog(ws, KEY).entries(0, 1, newest_first=True)[0][0]
    assert failed["outcome"] == "failed" and set(failed["detail"]) == {"status", "error", "quota_counted"}


# -- nothing record-level, no key, no token ----------------------------------------------------------

def _secrets_and_records(ws) -> tuple[list[str], list[str]]:
    con = duckdb.connect()
    ids = [r[0] for r in con.execute(f"select child_id from '{ws}/research/cohort.parquet' limit 300").fetchall()]
    ids += [r[0] for r in con.execute(f"select person_id from '{ws}/research/person.parquet' limit 300").fetchall()]
    ids += [r[0] for r in con.execute(
        f"select record_token from '{ws}/pseudonymised/identifiers/*.parquet' using sample 300 rows").fetchall()]
    ids += [r[0] for r in con.execute(
        f"select distinct surname from '{ws}/staged/earnings.parquet' where length(surname) >= 9 limit 200").fetchall()]
    con.close()
    secret = KEY.secret
    keys = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode(),
            record_key_secret(KEY).hex(), KEY.subkey(AUDIT_KEY_PURPOSE).hex()]
    return ids + [QUARANTINE_MARKER], keys


def test_no_route_returns_records_the_key_or_a_token(app, api, tokens, sessions, ws, caplog):
    caplog.set_level(logging.DEBUG)
    bodies = []
    for (method, path), roles in API.items():
        role = sorted(roles)[0]
        if path == "/api/tables/{name}/data":
            for name in json.loads((ws / "published" / "index.json").read_text())["tables"]:
                for fmt in ("csv", "json"):
                    bodies.append(api.get(f"/api/tables/{name}/data?format={fmt}", headers=_bearer(tokens[role])).text)
            continue
        bodies.append(_call(api, method, path, _bearer(tokens[role])).text)
    for role, urls in {"researcher": ["/catalogue", "/builder", "/catalogue/mobility_la_cohort",
                                      "/catalogue/transition_region?chart=bar&x=region",
                                      "/catalogue/attainment_fsm_ever_la"],
                       "auditor": ["/reports", "/reports/linkage/", "/reports/disclosure/", "/reports/quality/",
                                   "/reports/summary/quality.json", "/reports/summary/ingest.json", "/audit",
                                   "/audit/verify"],
                       "engineer": ["/runs", "/quarantine"]}.items():
        client, _ = sessions[role]
        for url in urls:
            r = client.get(url, follow_redirects=True)
            assert r.status_code == 200, url
            bodies.append(r.text)
    for page in (ws / "reports" / "quality" / "data_docs").rglob("*.html"):
        rel = page.relative_to(ws / "reports" / "quality" / "data_docs")
        bodies.append(sessions["auditor"][0].get(f"/reports/quality/{rel}").text)
    records, keys = _secrets_and_records(ws)
    assert len(records) > 500
    text = "\n".join(bodies)
    for value in records:
        assert value not in text, "a record-level value reached a response"
    for k in keys:
        assert k not in text
    for t in tokens.values():
        assert t not in text and t not in caplog.text
    # the quarantine page counts the two bad lines but never shows them
    q = sessions["engineer"][0].get("/quarantine").text
    assert "education" in q and "field_count" in q and QUARANTINE_MARKER not in q
    # nor do the service's own files hold the key or a token
    for f in list((ws / "service").iterdir()) + list((ws / "audit").iterdir()):
        content = f.read_text(errors="replace")
        for secret in keys + list(tokens.values()):
            assert secret not in content, f


def test_users_file_holds_scrypt_hashes_only(ws, tokens):
    path = ws / "service" / "users.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    users = {u["name"]: u for u in json.loads(path.read_text())["users"]}
    for role, token in tokens.items():
        u = users[f"svc-{role}"]
        assert u["hash"].startswith("scrypt$16384$8$1$") and token.split("_")[2] not in path.read_text()
        assert u["token_id"] == token.split("_")[1]
    salts = [u["hash"].split("$")[4] for u in users.values()]
    assert len(set(salts)) == len(salts)


# -- the audit log --------------------------------------------------------------------------------

def _fresh_log(tmp_path, n: int = 6) -> AuditLog:
    log = AuditLog(tmp_path, KEY)
    for i in range(1, n + 1):
        log.append(f"user{i}", "researcher", "table.view", {"table": f"t{i}"})
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def _write(log: AuditLog, lines: list[str]) -> None:
    log.path.write_text("".join(line + "\n" for line in lines))


def test_intact_log_verifies(tmp_path):
    log = _fresh_log(tmp_path)
    v = log.verify()
    assert v.ok and v.entries == 6 and v.mac_checked
    assert v.head == json.loads(_lines(log)[-1])["hash"]
    first = json.loads(_lines(log)[0])
    assert first["prev"] == "0" * 64 and first["hash"] == entry_hash(first)
    assert json.loads(_lines(log)[1])["prev"] == first["hash"]


def test_edit_is_detected_at_the_edited_entry(tmp_path):
    log = _fresh_log(tmp_path)
    lines = _lines(log)
    lines[2] = lines[2].replace('"t3"', '"t9"')
    _write(log, lines)
    v = log.verify()
    assert not v.ok and (v.first_bad_seq, v.first_bad_line, v.problem) == (3, 3, "edited")


def test_edit_with_recomputed_hash_is_detected_with_and_without_the_key(tmp_path):
    log = _fresh_log(tmp_path)
    lines = _lines(log)
    e = json.loads(lines[2])
    e["outcome"] = "refused"
    e["hash"] = entry_hash(e)
    lines[2] = json.dumps(e, sort_keys=True, separators=(",", ":"))
    _write(log, lines)
    v = log.verify()
    assert (v.ok, v.first_bad_seq, v.problem) == (False, 3, "edited") and "MAC" in v.message
    # without the key only the chain is checked: entry 4 no longer links to entry 3
    v = AuditLog(tmp_path, None).verify()
    assert (v.ok, v.first_bad_seq, v.first_bad_line, v.problem, v.mac_checked) == (False, 3, 3, "edited", False)


def test_deletion_is_detected_at_the_missing_entry(tmp_path):
    log = _fresh_log(tmp_path)
    lines = _lines(log)
    del lines[2]
    _write(log, lines)
    v = log.verify()
    assert (v.ok, v.first_bad_seq, v.first_bad_line, v.problem) == (False, 3, 3, "removed")


def test_reordering_is_detected_at_the_first_entry_out_of_place(tmp_path):
    log = _fresh_log(tmp_path)
    lines = _lines(log)
    lines[2], lines[3] = lines[3], lines[2]
    _write(log, lines)
    v = log.verify()
    assert (v.ok, v.first_bad_seq, v.first_bad_line, v.problem) == (False, 3, 3, "reordered")
    lines = _lines(_fresh_log(tmp_path / "b"))
    lines.append(lines.pop(1))             # entry 2 moved to the end
    log2 = AuditLog(tmp_path / "b", KEY)
    _write(log2, lines)
    v = log2.verify()
    assert (v.first_bad_seq, v.first_bad_line, v.problem) == (2, 2, "reordered")


def test_truncation_and_forged_appends_are_detected(tmp_path):
    log = _fresh_log(tmp_path)
    lines = _lines(log)
    _write(log, lines[:4])
    v = log.verify()
    assert (v.ok, v.first_bad_seq, v.problem) == (False, 5, "truncated")
    # a forger without the key appends an entry that links correctly: its MAC gives it away,
    # and without the key the head (still at entry 6) does
    _write(log, lines)
    last = json.loads(lines[-1])
    forged = {**last, "seq": 7, "prev": last["hash"], "actor": "mallory"}
    forged["hash"] = entry_hash(forged)
    _write(log, lines + [json.dumps(forged, sort_keys=True, separators=(",", ":"))])
    v = log.verify()
    assert (v.ok, v.first_bad_seq, v.problem) == (False, 7, "edited")
    v = AuditLog(tmp_path, None).verify()
    assert (v.ok, v.first_bad_seq, v.problem) == (False, 7, "inserted")


def test_appends_from_two_writers_keep_one_chain(tmp_path):
    a, b = AuditLog(tmp_path, KEY), AuditLog(tmp_path, KEY)     # e.g. the service and a CLI command

    def write(log, who):
        for i in range(40):
            log.append(who, "researcher", "table.view", {"i": i})

    threads = [threading.Thread(target=write, args=(log, f"w{n}")) for n, log in enumerate((a, b, a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    v = a.verify()
    assert v.ok and v.entries == 160
    assert [json.loads(x)["seq"] for x in _lines(a)] == list(range(1, 161))


def test_audit_page_verifies_the_live_log(sessions):
    client, _ = sessions["auditor"]
    r = client.get("/audit/verify")
    assert r.status_code == 200 and "entries intact" in r.text
    r = client.get("/audit")
    assert "builder.request" in r.text and "svc-researcher" in r.text


# -- the CLI -----------------------------------------------------------------------------------------

def test_cli_users_and_audit(run_cli, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.setenv("HHLINK_KEY", PORTAL_KEY_HEX)
    code, out, err = run_cli("users", "add", "carol", "--role", "auditor", "--workspace", str(ws))
    assert code == 0, err
    token = out.strip().splitlines()[-1]
    assert re.fullmatch(r"hhl_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", token)
    assert UserStore(ws).authenticate(token).role == "auditor"
    code, out, err = run_cli("users", "list", "--workspace", str(ws))
    assert code == 0 and "carol" in out and "auditor" in out and token not in out and "scrypt" not in out
    code, out, err = run_cli("users", "add", "carol", "--role", "researcher", "--workspace", str(ws))
    assert code != 0 and err.startswith("error:") and "exists" in err
    code, out, err = run_cli("users", "add", "Bad Name", "--role", "researcher", "--workspace", str(ws))
    assert code != 0 and "invalid" in err
    code, out, err = run_cli("audit", "verify", "--workspace", str(ws))
    assert code == 0 and out.startswith("ok: 1 entries intact") and "MACs checked" in out
    log = AuditLog(ws, KEY)
    for i in range(3):
        log.append("x", "researcher", "table.view", {"i": i})
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    code, out, err = run_cli("audit", "verify", "--workspace", str(ws))
    assert code == 2 and "TAMPERED" in out and "first bad entry: 2 (line 2, reordered)" in out
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("audit", "show", "--workspace", str(ws), "--last", "2")
    assert code == 0 and len(out.splitlines()) == 2 and token not in out
    # without the key nothing is changed (every change must be audited)
    monkeypatch.delenv("HHLINK_KEY")
    monkeypatch.delenv("HHLINK_KEY_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nokey"))
    before = (ws / "service" / "users.json").read_text()
    code, out, err = run_cli("users", "add", "dave", "--role", "engineer", "--workspace", str(ws))
    assert code != 0 and "key" in err and (ws / "service" / "users.json").read_text() == before
    code, out, err = run_cli("audit", "verify", "--workspace", str(ws))
    assert code == 2 and "no key: MACs not checked" in out


# -- schemathesis against the OpenAPI spec --------------------------------------------------------------

@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_schemathesis_sees_every_route(api_schema):
    ops = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert ops == set(API)


@pytest.mark.parametrize("method,path", sorted(API))
def test_api_spec_has_no_server_error(api_schema, tokens, method, path):
    """Schemathesis cases from the OpenAPI spec, valid and invalid (bounded: 10 of each per route)."""
    operation = api_schema[path][method]
    roles = API[(method, path)]
    token = tokens["researcher" if "researcher" in roles else sorted(roles)[0]]
    seen: dict[int, int] = {}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call(headers={"Authorization": f"Bearer {token}"})
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            case.validate_response(response, checks=[not_a_server_error])

        run()
    assert seen and max(seen) < 500, seen
