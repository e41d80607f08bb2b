"""Linkage end to end on a small population: generate, ingest, pseudonymise, link, evaluate."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import duckdb
import pytest

from linkage.config import load_config
from linkage.errors import HhlinkError
from linkage.link.stage import link
from linkage.link.linked_records import records_relation
from tests.conftest import PORTAL_KEY_HEX, copy_workspace

KEY = PORTAL_KEY_HEX               # the key of conftest's shared linked_4000
REQUIRED = ("person_pairwise_precision", "person_pairwise_recall", "person_pairwise_f1", "person_cluster_f1",
            "household_accuracy", "parent_child_precision", "parent_child_recall")


@pytest.fixture(scope="module")
def linked(linked_4000, tmp_path_factory):
    """A 4,000-person population taken through every stage up to evaluation (linked once per session:
    a copy of conftest's ``linked_4000``, which ``test_assemble`` shares)."""
    from linkage.evaluate.stage import evaluate

    mp = pytest.MonkeyPatch()
    mp.setenv("HHLINK_KEY", KEY)
    root = copy_workspace(linked_4000[0], tmp_path_factory.mktemp("linked") / "ws")
    cfg = load_config(generate={"persons": 4000, "seed": 5})
    summary = linked_4000[1]
    metrics = evaluate(cfg, root)
    yield root, summary, metrics
    mp.undo()


def test_linkage_meets_quality_targets_on_a_small_population(linked):
    _, summary, m = linked
    assert summary["records"] > summary["identities"] > summary["persons"] > 3000
    assert m["person_pairwise_precision"] >= 0.995
    assert m["person_pairwise_recall"] >= 0.995
    assert m["person_cluster_f1"] >= 0.98
    assert m["household_accuracy"] >= 0.85
    assert m["parent_child_precision"] >= 0.98 and m["parent_child_recall"] >= 0.85


def test_evaluation_json_holds_the_required_keys(linked):
    root, _, _ = linked
    ev = json.loads((root / "reports" / "evaluation.json").read_text())
    for key in REQUIRED:
        assert 0.0 <= ev[key] <= 1.0, key
    thresholds = [r["threshold"] for r in ev["person_metrics_by_threshold"]]
    assert thresholds == load_config().link.evaluation_thresholds


def test_linked_zone_contents(linked):
    root, summary, _ = linked
    out = root / "linked"
    model = json.loads((out / "model.json").read_text())
    assert {c["output_column_name"] for c in model["comparisons"]} >= {"forename", "surname", "dob", "postcode", "nino"}
    con = duckdb.connect()
    n_records = con.execute(f"select count(*), count(distinct record_token) from {records_relation(out)}").fetchall()[0]
    landing = sum(con.execute(f"select count(*) from read_csv('{root}/landing/{s}.csv')").fetchall()[0][0]
                  for s in ("education", "benefits", "earnings"))
    assert n_records == (landing, landing) == (summary["records"], summary["records"])
    bad = con.execute(f"select count(*) from '{out}/pairs.parquet' where match_probability < "
                      f"{load_config().link.keep_pairs_above}").fetchall()[0][0]
    assert bad == 0
    # the anchored prediction rules, counted exactly: anchors first, then the rules on representatives
    rules = [b["rule"] for b in summary["blocking"]]
    assert rules[:4] == ["nino_tok", "upn_tok", "fn_tok and sn_tok and dob_tok",
                         "same anchor group (through a chain of the rules above)"]
    assert all("(anchored)" in r for r in rules[4:]) and not any(b["is_estimate"] for b in summary["blocking"])
    assert summary["blocking"][-1]["cumulative_comparisons"] >= summary["pairs_scored"]
    # every person-year in households belongs to exactly one household
    dup = con.execute(f"select count(*) from (select person_key, year from '{out}/households.parquet' "
                      "group by all having count(*) > 1)").fetchall()[0][0]
    assert dup == 0


def test_quality_report_renders_offline_in_chromium(linked):
    root, _, _ = linked
    html_path = root / "reports" / "linkage" / "report.html"
    report = json.loads((root / "reports" / "linkage" / "report.json").read_text())
    assert report["expected_vs_true"]["true_pairwise_precision"] is not None
    assert {r["source"] for r in report["completeness"]} == {"education", "benefits", "earnings"}
    text = html_path.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text
    assert "<script" not in text
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--dump-dom", html_path.as_uri()],
            capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Linkage-quality report" in dom.stdout
    assert dom.stdout.count("<svg") >= 2            # Splink's charts, rendered inline
    assert "Implausible links" in dom.stdout


def test_link_without_identifiers_is_a_clear_error(tmp_path):
    with pytest.raises(HhlinkError, match="no identifiers to link"):
        link(load_config(), tmp_path)


def test_linked_outputs_hold_no_cleartext_identifiers(linked):
    root, _, _ = linked
    con = duckdb.connect()
    values = set()
    for source, cols in (("education", "forename, surname, upn, postcode"),
                         ("earnings", "forename, surname, nino, postcode")):
        for row in con.execute(f"select distinct {cols} from read_csv('{root}/landing/{source}.csv', "
                               "all_varchar=true) using sample 300 rows (reservoir, 1)").fetchall():
            values.update(v for v in row if v and len(v) >= 5)
    assert len(values) > 200
    con.execute("create table clear (v varchar)")
    con.executemany("insert into clear values (?)", [(v,) for v in values] + [(v.upper(),) for v in values])
    scanned = 0
    for folder in (root / "linked", root / "reports" / "linkage"):
        for path in folder.rglob("*"):
            if not path.is_file():
                continue
            scanned += 1
            if path.suffix == ".parquet":
                # parquet is compressed: compare its decoded text values, not its bytes
                cols = [c for c, t, *_ in con.execute(f"describe select * from '{path}'").fetchall() if t == "VARCHAR"]
                for col in cols:
                    hits = con.execute(f"select count(*) from '{path}' where \"{col}\" in (select v from clear)").fetchall()
                    assert hits[0][0] == 0, (path, col)
            else:
                blob = path.read_bytes()
                found = [v for v in values if v.encode() in blob or v.upper().encode() in blob]
                assert not found, (path, len(found))
    assert scanned >= 8


def test_chunked_prediction_scores_the_same_pairs(linked, tmp_path):
    """Prediction in chunks (as at 1M persons) keeps exactly the pairs and persons of one pass."""
    import shutil

    root, summary, _ = linked
    ws = tmp_path / "ws"
    shutil.copytree(root / "pseudonymised", ws / "pseudonymised")
    cfg = load_config(link={"predict_chunk_identities": 5000})
    mp = pytest.MonkeyPatch()
    mp.setenv("HHLINK_KEY", KEY)
    try:
        chunked = link(cfg, ws, model=root / "linked" / "model.json")
    finally:
        mp.undo()
    assert chunked["predict_chunks"] > 1 and summary.get("predict_chunks", 1) == 1
    con = duckdb.connect()
    q = ("select unique_id_l, unique_id_r, round(match_weight, 6) from '{}/linked/pairs.parquet' "
         "order by all")
    assert con.execute(q.format(ws)).fetchall() == con.execute(q.format(root)).fetchall()
    persons = "select unique_id, person_key from '{}/linked/identities.parquet' order by all"
    assert con.execute(persons.format(ws)).fetchall() == con.execute(persons.format(root)).fetchall()


def test_floor_levels_leaves_no_veto_from_a_level_training_never_saw():
    import math

    from linkage.link.model import MIN_WEIGHT, floor_levels

    unseen = "level not observed in training dataset"
    settings = {"comparisons": [{"output_column_name": "sex", "comparison_levels": [
        {"sql_condition": "sex_tok_l IS NULL", "is_null_level": True},
        {"sql_condition": "sex_tok_l = sex_tok_r", "label_for_charts": "exact", "m_probability": 1.0,
         "u_probability": 0.5},
        {"sql_condition": "a_l = b_r", "label_for_charts": "swapped", "m_probability": unseen, "u_probability": unseen},
        {"sql_condition": "ELSE", "label_for_charts": "All other comparisons", "m_probability": 1e-9,
         "u_probability": 0.5}]}]}
    raised = floor_levels(settings)
    assert raised == ["sex: swapped (u)", "sex: swapped (m)", "sex: All other comparisons (m)"]
    exact, swapped, other = settings["comparisons"][0]["comparison_levels"][1:]
    assert math.log2(other["m_probability"] / other["u_probability"]) >= MIN_WEIGHT - 0.01   # not a veto
    # a level training never saw weighs no less than "All other"
    assert math.log2(swapped["m_probability"] / swapped["u_probability"]) >= \
        math.log2(other["m_probability"] / other["u_probability"]) - 0.01
    assert sum(lv["m_probability"] for lv in (exact, swapped, other)) == pytest.approx(1)


def _identities(con, rows: list[dict]) -> None:
    """An ``identities`` table with every column the anchor and prediction rules read, from ``rows``."""
    from linkage.link.blocking import ANCHOR_RULES
    from linkage.link.model import PREDICTION_BLOCKS, rule_columns

    cols = sorted(set().union(*(rule_columns(r) for r in (*ANCHOR_RULES, *PREDICTION_BLOCKS))))
    types = {c: "blob" if c.endswith("_bf") else "varchar" for c in cols}
    con.execute(f"create table identities (unique_id varchar, source varchar, n_records integer, "
                f"{', '.join(f'{c} {t}' for c, t in types.items())})")
    for r in rows:
        r = {"source": "earnings", **r}
        con.execute(f"insert into identities ({', '.join(r)}) values ({', '.join('?' * len(r))})", list(r.values()))


def _blocked(con) -> tuple[set[frozenset], list[dict], dict]:
    from linkage.link.blocking import anchored_rules, build_blocking_keys
    from linkage.link.stage import blocking_counts

    rules = anchored_rules()
    build_blocking_keys(con, "identities", "blocking_keys", rules)
    con.execute("create table ids_earnings as select i.*, k.* exclude (unique_id) "
                "from identities i join blocking_keys k using (unique_id)")
    pairs = set()
    from linkage.link.model import rule_sql
    for r in rules:
        pairs |= {frozenset(p) for p in con.execute(
            f"select l.unique_id, r.unique_id from ids_earnings l join ids_earnings r on ({rule_sql(r.rule)}) "
            "and l.unique_id < r.unique_id").fetchall()}
    counts, alone = blocking_counts(con, ["ids_earnings"], rules)
    return pairs, counts, alone


def test_an_anchor_group_larger_than_max_group_is_left_to_its_own_rule():
    """A placeholder NINO on MAX_GROUP + 1 identities: the NINO rule still pairs them, but the
    same-group rule does not repeat it (nor would it reach a chain of thousands); a group of
    MAX_GROUP identities is still one group."""
    from linkage.link.blocking import MAX_GROUP

    con = duckdb.connect()
    big = [{"unique_id": f"b{i:03d}", "n_records": 1, "nino_tok": "PLACEHOLDER", "dob_tok": f"D{i}"}
           for i in range(MAX_GROUP + 1)]
    ok = [{"unique_id": f"g{i:03d}", "n_records": 1, "upn_tok": "U", "dob_tok": f"E{i}"} for i in range(MAX_GROUP)]
    _identities(con, big + ok)
    pairs, counts, u = _blocked(con)
    groups = dict(con.execute("select left(unique_id, 1), count(distinct anchor_group) filter (where anchor_group is not null) "
                              "from ids_earnings group by 1").fetchall())
    assert groups == {"b": 0, "g": 1}
    by_rule = {c["rule"]: c["marginal_comparisons"] for c in counts}
    assert by_rule["nino_tok"] == len(big) * (len(big) - 1) // 2
    assert by_rule["upn_tok"] == len(ok) * (len(ok) - 1) // 2
    assert next(n for r, n in by_rule.items() if r.startswith("same anchor group")) == 0
    assert len(pairs) == by_rule["nino_tok"] + by_rule["upn_tok"] and u["identities_no_rule_compares"] == 0


def test_the_report_counts_identities_no_blocking_rule_compares():
    con = duckdb.connect()
    _identities(con, [
        {"unique_id": "a", "n_records": 2, "nino_tok": "N1"},          # a and b share a NINO
        {"unique_id": "b", "n_records": 1, "nino_tok": "N1"},
        # c's date with day and month swapped in d: one date context, the forename sound keyed with it
        {"unique_id": "c", "n_records": 1, "dob_tok": "D1", "dobc_tok": "C1", "fn_phon_tok": "F"},
        {"unique_id": "d", "n_records": 1, "dob_tok": "D2", "dobc_tok": "C1", "fn_phon_tok": "F"},
        {"unique_id": "e", "n_records": 3, "dob_tok": "D3", "dobc_tok": "C3", "fn_phon_tok": "G"},  # alone
        {"unique_id": "f", "n_records": 1, "nino_tok": "N2"},          # alone
    ])
    pairs, counts, u = _blocked(con)
    assert pairs == {frozenset("ab"), frozenset("cd")}
    assert counts[-1]["cumulative_comparisons"] == 2 and sum(c["marginal_comparisons"] for c in counts) == 2
    assert u["identities"] == 6 and u["identities_no_rule_compares"] == 2
    assert u["identities_share"] == pytest.approx(2 / 6, abs=1e-6)
    assert u["records_share"] == pytest.approx(4 / 9, abs=1e-6)


def test_anchored_blocking_compares_few_identities_per_anchor_group_and_keeps_every_link():
    """Two people born the same day with forenames that sound alike, four identities each.

    Without anchors "dob and forename sound" would compare all 16 pairs across the two; with
    them each person's identities are one anchor group (a NINO or a UPN for some, forename,
    surname and date of birth for another, joined through a chain), so the rule compares only
    the groups' representatives (most records first) across, and every identity of a group is
    compared with every other of its group.
    """
    from linkage.link.blocking import REPRESENTATIVES

    con = duckdb.connect()
    common = {"dob_tok": "D", "dobc_tok": "D", "fn_phon_tok": "F"}
    people = {
        "p": [{"unique_id": "p1", "n_records": 5, "nino_tok": "N1", "fn_tok": "ann", "sn_tok": "x"},
              {"unique_id": "p2", "n_records": 3, "nino_tok": "N1", "fn_tok": "anne", "sn_tok": "x"},
              {"unique_id": "p3", "n_records": 1, "nino_tok": "N1", "fn_tok": "anna", "sn_tok": "xx"},
              {"unique_id": "p4", "n_records": 1, "fn_tok": "ann", "sn_tok": "x"}],     # joined to p1 by name+dob
        "q": [{"unique_id": "q1", "n_records": 4, "upn_tok": "U1", "fn_tok": "an", "sn_tok": "y"},
              {"unique_id": "q2", "n_records": 2, "upn_tok": "U1", "fn_tok": "ann", "sn_tok": "z"},
              {"unique_id": "q3", "n_records": 2, "upn_tok": "U1", "fn_tok": "ann", "sn_tok": "zz"},
              {"unique_id": "q4", "n_records": 1, "fn_tok": "ann", "sn_tok": "z"}],     # joined to q2, so to q1
    }
    _identities(con, [{**r, **common} for rows in people.values() for r in rows])
    pairs, counts, u = _blocked(con)
    reps = {k: [r["unique_id"] for r in sorted(rows, key=lambda r: (-r["n_records"], r["unique_id"]))][:REPRESENTATIVES]
            for k, rows in people.items()}
    across = {p for p in pairs if len({x[0] for x in p}) > 1}
    assert across == {frozenset({a, b}) for a in reps["p"] for b in reps["q"]}
    assert len(across) < 16
    for rows in people.values():                     # every identity of a group is compared with every other
        ids = [r["unique_id"] for r in rows]
        assert {frozenset({a, b}) for a in ids for b in ids if a < b} <= pairs
    dob_fn = next(c for c in counts if c["rule"].startswith("dobc_tok and fn_phon_tok"))
    assert dob_fn["marginal_comparisons"] == len(across) and "(anchored)" in dob_fn["rule"]
    chain = next(c for c in counts if c["rule"].startswith("same anchor group"))
    assert chain["marginal_comparisons"] == 4      # p2-p4, p3-p4, q1-q4, q3-q4: no value in common, one group
    assert u["identities_no_rule_compares"] == 0



def test_an_em_estimate_of_zero_is_kept_for_the_floor_rather_than_ending_training():
    """Splink refuses m = 0.0 in a level's setter; the compat patch keeps it as 1e-300 (floored later)."""
    import splink.comparison_level_library as cll
    from splink.internals import expectation_maximisation as em

    from linkage.compat.splink_em import allow_zero_em_estimates

    def level():
        lv = cll.ExactMatchLevel("fn_tok").get_comparison_level("duckdb")
        lv._comparison_vector_value = 1
        return lv

    lookup = {"forename": {1: {"m_probability": 0.0, "u_probability": 0.25}}}
    unpatched = getattr(em.populate_m_u_from_lookup, "__wrapped__", em.populate_m_u_from_lookup)
    with pytest.raises(ValueError, match="m_probability"):
        unpatched({}, level(), "forename", {"forename": {1: dict(lookup["forename"][1])}})
    allow_zero_em_estimates()
    allow_zero_em_estimates()                      # idempotent: one wrapper
    lv = level()
    em.populate_m_u_from_lookup({}, lv, "forename", lookup)
    assert lv.m_probability == 1e-300 and lv.u_probability == 0.25


def test_year_typo_u_is_the_dates_coincidence_not_the_names():
    # the zone's "same day and month, year one apart" level reads name_md_tok, so pairs agree on it
    # only with the full name too; its u is set to the dates' own coincidence: P(born one year
    # apart) x 1/365.25, from the identities' clear birth years
    import duckdb

    from linkage.link.model import model_settings
    from linkage.link.stage import YEAR_TYPO_LEVEL, year_typo_u

    con = duckdb.connect()
    con.execute("create table identities as select * from (values (1990), (1990), (1991), (1993), (null)) t(birth_year)")
    settings = model_settings("duckdb").create_settings_dict("duckdb")
    assert year_typo_u(settings, con) == [": ".join(YEAR_TYPO_LEVEL)]
    level = next(lv for c in settings["comparisons"] if c["output_column_name"] == "dob"
                 for lv in c["comparison_levels"] if lv.get("label_for_charts") == YEAR_TYPO_LEVEL[1])
    # 4 identities with a year: 1990x1991 twice -> ordered pairs 2 x 2 of 4 x 4
    assert level["u_probability"] == pytest.approx(2 * 2 / 16 / 365.25)
    # link-files' plain model reads the level through day and month tokens: its sampled u stands
    plain = model_settings("duckdb", context=False).create_settings_dict("duckdb")
    assert year_typo_u(plain, con) == []


def test_the_threshold_is_set_on_the_evidence_so_a_larger_population_needs_no_more_of_it():
    """effective_threshold: the probability at which the Bayes factor reaches threshold_evidence_bits."""
    import math

    from linkage.link.stage import effective_threshold

    lc = load_config().link
    assert lc.threshold_evidence_bits > 0           # the default
    logit = lambda p: math.log2(p / (1 - p))        # noqa: E731
    found = {}
    for prior in (8e-6, 8e-7, 8e-8):                # about 100,000, 1,000,000 and 10,000,000 persons
        p = effective_threshold(lc, prior)
        # the match weight at the threshold, less the prior, is the configured evidence
        assert logit(p) - logit(prior) == pytest.approx(lc.threshold_evidence_bits, abs=1e-6)
        assert p < lc.threshold
        found[prior] = p
    assert found[8e-6] > found[8e-7] > found[8e-8]  # the same evidence is a lower posterior in a larger population
    # a small population: the evidence gives a posterior above the threshold, which decides
    assert effective_threshold(lc, 2e-4) == lc.threshold
    # never a pair the model finds more likely two people, and never below the pairs kept
    assert effective_threshold(lc, 1e-15) == 0.5
    high = lc.model_copy(update={"keep_pairs_above": 0.7})
    assert effective_threshold(high, 1e-15) == 0.7
    # without the setting, the probability threshold as configured
    plain = lc.model_copy(update={"threshold_evidence_bits": 0})
    assert effective_threshold(plain, 8e-6) == plain.threshold
    with pytest.raises(HhlinkError):
        effective_threshold(lc, 0.0)


def test_persons_are_the_components_of_pairs_at_the_threshold_the_summary_states(linked):
    """The summary's threshold is the one derived from the model's prior, and clustering used it."""
    from linkage.link.stage import effective_threshold

    root, summary, _ = linked
    out = root / "linked"
    prior = json.loads((out / "model.json").read_text())["probability_two_random_records_match"]
    assert summary["threshold"] == effective_threshold(load_config().link, prior)
    con = duckdb.connect()
    con.execute(f"create table ids as select unique_id, person_key from '{out}/identities.parquet'")
    # every pair at or above it joins one person, and some pair just below it joins two
    split = con.execute(f"""select count(*) from '{out}/pairs.parquet' p join ids l on l.unique_id = p.unique_id_l
                            join ids r on r.unique_id = p.unique_id_r
                            where p.match_probability >= {summary['threshold']!r} and l.person_key != r.person_key""").fetchone()[0]
    assert split == 0
    below = con.execute(f"""select count(*) from '{out}/pairs.parquet' p join ids l on l.unique_id = p.unique_id_l
                            join ids r on r.unique_id = p.unique_id_r
                            where p.match_probability < {summary['threshold']!r} and l.person_key != r.person_key""").fetchone()[0]
    assert below > 0
    ev = json.loads((root / "reports" / "evaluation.json").read_text())
    assert ev["linkage_threshold"] == summary["threshold"]


def test_a_threshold_given_to_hhlink_link_alone_decides():
    """hhlink link --threshold P: P is the threshold whatever the population; without it, the config's rule."""
    from linkage.cli.link import link_overrides
    from linkage.link.stage import effective_threshold

    given = load_config(link=link_overrides(None, 0.9999)).link
    assert effective_threshold(given, 8e-7) == 0.9999          # a large population: the evidence rule would go lower
    default = load_config(link=link_overrides(None, None)).link
    assert default.threshold_evidence_bits == load_config().link.threshold_evidence_bits > 0
    assert effective_threshold(default, 8e-7) < default.threshold
