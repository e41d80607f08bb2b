"""Keyless re-identification attacks on a workspace: what someone holding the zones after
pseudonymisation, but not the key, recovers (issue 16).

The attacker holds ``pseudonymised/identifiers/``, ``pseudonymised/payload/``, ``linked/``,
``research/`` and ``published/``, knows the population size and holds public
name-frequency tables: here the generator's own reference lists
(``synthetic_data/reference/*.csv``), the attacker's best case. Every attack below reads
only those. Scoring needs to know which person each row really is: that comes from
``truth/`` joined through the crosswalk, which is decrypted with the key (``--key-file``)
in :func:`_score_table` only, after the attacks have produced their guesses.

Attacks (each scored as the share of records re-identified, goal < 1%):

* row order: row i of ``identifiers/<source>`` is landing row i, and row i of ``payload/``
  is row i of ``identifiers/``;
* sex token: the ``sex_tok`` whose records have the higher median pay is M;
* forename-initial token: frequency alignment (per sex) with the reference lists;
* forename token: frequency alignment within (sex, initial) cells, with the token's
  ethnic-group profile (education payload) beside the reference's name groups
  (minimum-cost assignment);
* surname token: the same over all surnames, by name group;
* whole Bloom-filter patterns: the forename attack with ``fn_bf`` in place of ``fn_tok``;
* graph matching on Bloom-filter similarity: every other ``fn_bf`` named by its Dice with
  the 300 most frequent (anchored) filters against cleartext bigram Dice of candidate names;
* full name + birth year (clear) + sex: rows with all of them right, and persons whose
  combination is unique in the population (singled out);
* date of birth: from ``dob_day_tok``, ``dob_month_tok``, ``dob_swap_tok`` and birth year;
* pay join: research person-years joined to payload earnings on exact (year, pay);
* cross-project joins: two projects' research extracts joined on (year, pay) values, on
  whole pay sequences, and by nearest-neighbour pay sequences when the second extract
  differs (coarser pay, one year fewer).

``research/`` is encrypted at rest under a per-project subkey (``zone:research:<project>``):
the keyless view reads none of it; the zone-keys view gives the attacker the research
subkeys of two projects as well, the residual risk of the cross-project joins.

Usage:
    python -m bench.privacy WORKSPACE --key-file KEY [--view both|keyless|zone-keys] [--label before]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from linkage.crosswalk import CROSSWALK_FILE, crosswalk_table
from linkage.db import connect, read_literal
from linkage.keys import load_master_key
from synthetic_data.reference import ETHNICITIES

REFERENCE = Path(__file__).resolve().parents[1] / "synthetic_data" / "reference"
RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 0.01
# the same workspace's linkage accuracy (reports/evaluation.json), shown beside the attacks
LINKAGE_FIGURES = ("person_pairwise_precision", "person_pairwise_recall", "person_pairwise_f1",
                   "person_cluster_f1", "household_accuracy", "parent_child_precision", "parent_child_recall")
SOURCES = ("education", "benefits", "earnings")
GROUP_OF = {code: group for code, _, group in ETHNICITIES}
GROUPS = sorted({g for _, _, g in ETHNICITIES})
GROUP_SHARE = pd.Series({g: sum(w for _, w, gg in ETHNICITIES if gg == g) for g in GROUPS})


# -- the attacker's view -------------------------------------------------------------------------

def keyless_reads(ws: Path) -> dict[str, tuple[int, int]]:
    """Per zone: (rows read without any key by DuckDB or Arrow, rows the zone holds per metadata.json)."""
    import duckdb
    import pyarrow.parquet as pq

    held = sum(json.loads((ws / "pseudonymised" / "metadata.json").read_text())["rows"].values())
    research = ws / "research"
    research_rows = json.loads((research / "metadata.json").read_text())["rows"] if (research / "metadata.json").exists() else {}
    out = {}
    for zone, folder in (("identifiers", ws / "pseudonymised" / "identifiers"),
                         ("payload", ws / "pseudonymised" / "payload"), ("research", research)):
        got = 0
        if zone == "research":
            held = sum(n for t, n in research_rows.items() if (research / f"{t}.parquet").exists())
        for f in sorted(folder.glob("*.parquet")):
            for read in (lambda: connect().execute(f"SELECT count(*) FROM {read_literal(f)}").fetchall()[0][0],
                         lambda: pq.read_table(f).num_rows):
                try:
                    got += read()
                    break
                except (duckdb.Error, OSError):
                    continue
        out[zone] = (got, held)
    return out


def _load(con, ws: Path, ids_key, pay_key) -> None:
    """The zones as a holder of the two zone subkeys (not the master key) reads them, in file order."""
    from linkage.pseudonymise.store import read_encrypted

    cols = ["record_token", "source", "year", "birth_year", "sex_tok", "fn_tok", "sn_tok", "fn_initial_tok",
            "dob_tok", "dob_day_tok", "dob_month_tok", "dob_swap_tok", "fn_bf"]
    parts = []
    for s in SOURCES:
        con.register(f"ids_{s}_arrow", read_encrypted(ws / "pseudonymised" / "identifiers" / f"{s}.parquet",
                                                      ids_key, "identifiers", cols))
        parts.append(f"SELECT row_number() OVER () - 1 AS pos, * REPLACE (hex(fn_bf) AS fn_bf) FROM ids_{s}_arrow")
        con.register(f"pay_{s}_arrow", read_encrypted(ws / "pseudonymised" / "payload" / f"{s}.parquet",
                                                      pay_key, "payload"))
        con.execute(f"CREATE TABLE pay_{s} AS SELECT row_number() OVER () - 1 AS pos, * FROM pay_{s}_arrow")
    con.execute(f"CREATE TABLE ids AS {' UNION ALL '.join(parts)}")
    # pseudo-persons: records agreeing on name, date of birth and sex tokens (no key needed)
    con.execute("""CREATE TABLE pp AS SELECT *, row_number() OVER (ORDER BY fn_tok, sn_tok, dob_tok, sex_tok) AS ppid
                   FROM (SELECT fn_tok, sn_tok, dob_tok, sex_tok, any_value(fn_initial_tok) AS ini,
                         any_value(fn_bf) AS fn_bf, any_value(birth_year) AS birth_year
                         FROM ids WHERE fn_tok IS NOT NULL GROUP BY ALL)""")
    # each pseudo-person's ethnic group from the education payload (the modal one)
    con.execute("""CREATE TABLE pp_eth AS SELECT ppid, mode(e.ethnicity) AS ethnicity
                   FROM ids i JOIN pay_education e USING (record_token)
                   JOIN pp USING (fn_tok, sn_tok, dob_tok, sex_tok) GROUP BY ppid""")


def _reference() -> tuple[pd.DataFrame, pd.DataFrame]:
    fore = pd.read_csv(REFERENCE / "forenames.csv")
    sur = pd.read_csv(REFERENCE / "surnames.csv")
    for t, by in ((fore, ["sex", "group"]), (sur, ["group"])):
        t["name"] = t["name"].str.upper()
        t["p"] = t["weight"] / t.groupby(by)["weight"].transform("sum")
    return fore, sur


# -- attacks: each returns guesses keyed by something the attacker holds -------------------------

def attack_sex(con) -> dict[str, str]:
    """sex_tok -> 'M' / 'F': the token whose earnings records have the higher median pay is M."""
    med = con.execute("""SELECT i.sex_tok, median(p.pay) FROM ids i JOIN pay_earnings p USING (record_token)
                         WHERE i.sex_tok IS NOT NULL GROUP BY 1 ORDER BY 2 DESC""").fetchall()
    return {tok: ("M" if i == 0 else "F") for i, (tok, _) in enumerate(med)}


def _assign(obs: pd.DataFrame, exp: pd.DataFrame, weight: float) -> dict:
    """Minimum-cost matching of observed tokens to candidate values: log-count distance plus
    ``weight`` times the L1 distance of the ethnic-group profiles."""
    if obs.empty or exp.empty:
        return {}
    cost = np.abs(np.log(obs["n"].to_numpy()[:, None] + 0.5) - np.log(exp["n"].to_numpy()[None, :] + 0.5))
    if weight:
        po, pe = obs[GROUPS].to_numpy(), exp[GROUPS].to_numpy()
        known = obs["known"].to_numpy()[:, None] >= 3
        cost = cost + weight * known * np.abs(po[:, None, :] - pe[None, :, :]).sum(axis=2)
    rows, cols = linear_sum_assignment(cost)
    return dict(zip(obs.index[rows], exp.index[cols]))


def _observed(con, token: str, by: str = "") -> pd.DataFrame:
    """Per token: pseudo-persons carrying it, and the ethnic-group profile of those with education rows."""
    df = con.execute(f"""SELECT pp.{token} AS tok, {by or "NULL"} AS cell, e.ethnicity
                         FROM pp LEFT JOIN pp_eth e USING (ppid) WHERE pp.{token} IS NOT NULL""").df()
    df["group"] = df["ethnicity"].map(GROUP_OF)
    n = df.groupby("tok").size().rename("n")
    prof = pd.crosstab(df["tok"], df["group"]).reindex(columns=GROUPS, fill_value=0)
    known = prof.sum(axis=1).rename("known")
    prof = prof.div(known.where(known > 0, 1), axis=0)
    cell = df.groupby("tok")["cell"].agg(lambda s: s.mode().iloc[0] if s.notna().any() else None)
    return pd.concat([n, known, prof, cell.rename("cell")], axis=1).reindex(n.index).fillna({"known": 0, **{g: 0.0 for g in GROUPS}})


def _expected_names(ref: pd.DataFrame, by: list[str], total: float) -> pd.DataFrame:
    """Expected persons per reference name (group mix of the population) and its group profile."""
    r = ref.copy()
    r["m"] = r["p"] * r["group"].map(GROUP_SHARE) * (0.5 if "sex" in by else 1.0)
    exp = r.pivot_table(index=["name", *by], columns="group", values="m", aggfunc="sum", fill_value=0)
    exp = exp.reindex(columns=GROUPS, fill_value=0)
    n = exp.sum(axis=1)
    exp = exp.div(n, axis=0)
    exp["n"] = n * total
    return exp.reset_index()


def attack_initial(con, sex: dict[str, str], fore: pd.DataFrame) -> dict[str, str]:
    """fn_initial_tok -> letter: per-sex counts matched with the reference's per-sex initial shares."""
    df = con.execute("SELECT ini, sex_tok, count(*) AS n FROM pp WHERE ini IS NOT NULL GROUP BY ALL").df()
    df["sex"] = df["sex_tok"].map(sex)
    obs = df.pivot_table(index="ini", columns="sex", values="n", aggfunc="sum", fill_value=0)
    obs = obs.reindex(columns=["F", "M"], fill_value=0)
    r = fore.assign(letter=fore["name"].str[0], m=fore["p"] * fore["group"].map(GROUP_SHARE))
    exp = r.pivot_table(index="letter", columns="sex", values="m", aggfunc="sum", fill_value=0)
    exp = exp.reindex(columns=["F", "M"], fill_value=0) / exp.sum().to_numpy() * obs.sum().to_numpy()
    cost = np.abs(np.log(obs.to_numpy()[:, None, :] + 0.5) - np.log(exp.to_numpy()[None, :, :] + 0.5)).sum(axis=2)
    rows, cols = linear_sum_assignment(cost)
    return dict(zip(obs.index[rows], exp.index[cols]))


def attack_forename(con, sex: dict[str, str], initial: dict[str, str], fore: pd.DataFrame,
                    column: str = "fn_tok") -> dict[str, str]:
    """fn_tok (or fn_bf) -> forename, matched within (sex, initial) cells by count and group profile."""
    by = ("CASE " + " ".join(f"WHEN pp.sex_tok = '{t}' THEN '{s}'" for t, s in sex.items()) + " END"
          " || ':' || CASE " + " ".join(f"WHEN pp.ini = '{t}' THEN '{c}'" for t, c in initial.items()) + " END")
    obs = _observed(con, column, by)
    total = con.execute("SELECT count(*) FROM pp").fetchall()[0][0]
    exp = _expected_names(fore, ["sex"], total)
    exp["cell"] = exp["sex"] + ":" + exp["name"].str[0]
    exp = exp.set_index("name", drop=False)
    guess = {}
    for cell, o in obs.groupby("cell"):
        e = exp[exp["cell"] == cell].set_index("name")
        guess.update(_assign(o, e, weight=2.0))
    return guess


def _bigrams(name: str) -> set[str]:
    padded = f"_{name}_"
    return {padded[i:i + 2] for i in range(len(padded) - 1)}


def attack_forename_graph(con, anchors: dict[str, str], sex: dict[str, str], initial: dict[str, str],
                          fore: pd.DataFrame, n_anchors: int = 300) -> dict[str, str]:
    """fn_bf -> forename for every filter, by similarity to anchor filters (graph matching).

    The ``n_anchors`` most frequent filters keep their frequency-attack names. Each other
    filter's Dice with every anchor is compared with what its candidate names' cleartext
    bigram Dice with the anchors' names predicts (a line fitted on anchor pairs, where both
    are known); the candidate (same sex and initial) with the least squared error wins. This
    reaches rare names and misspellings, which frequency alone cannot.
    """
    df = con.execute("""SELECT fn_bf, count(*) AS n, mode(ini) AS ini, mode(sex_tok) AS sex_tok FROM pp
                        WHERE fn_bf IS NOT NULL GROUP BY 1 ORDER BY n DESC, fn_bf""").df()
    raw = np.frombuffer(b"".join(bytes.fromhex(h) for h in df["fn_bf"]), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(len(df), -1), axis=1).astype(np.float32)
    is_anchor = df["fn_bf"].isin(anchors).to_numpy() & (np.arange(len(df)) < n_anchors)
    a_idx = np.nonzero(is_anchor)[0]
    a_names = [anchors[h] for h in df["fn_bf"].iloc[a_idx]]
    weight = bits.sum(axis=1)
    dice_f = 2 * (bits @ bits[a_idx].T) / (weight[:, None] + weight[a_idx][None, :])
    a_grams = [_bigrams(n) for n in a_names]

    def clear_dice(names: list[str]) -> np.ndarray:
        out = np.empty((len(names), len(a_grams)), dtype=np.float32)
        for i, n in enumerate(names):
            g = _bigrams(n)
            out[i] = [2 * len(g & h) / (len(g) + len(h)) for h in a_grams]
        return out

    # calibrate filter Dice against cleartext Dice on anchor pairs (off the diagonal)
    c_anchor = clear_dice(a_names)
    f_anchor = dice_f[a_idx]
    off = ~np.eye(len(a_idx), dtype=bool)
    slope, intercept = np.polyfit(c_anchor[off], f_anchor[off], 1)
    ref = fore.groupby(["name", "sex"], as_index=False)["weight"].sum()
    ref["letter"] = ref["name"].str[0]
    predicted = intercept + slope * clear_dice(ref["name"].tolist())
    guess = {h: anchors[h] for h in df["fn_bf"].iloc[a_idx]}
    for i in np.nonzero(~is_anchor)[0]:
        cand = ((ref["sex"] == sex.get(df["sex_tok"].iat[i])) & (ref["letter"] == initial.get(df["ini"].iat[i]))).to_numpy()
        if not cand.any():
            continue
        err = ((predicted[cand] - dice_f[i][None, :]) ** 2).sum(axis=1)
        guess[df["fn_bf"].iat[i]] = ref["name"].to_numpy()[cand][int(np.argmin(err))]
    return guess


def attack_surname(con, sur: pd.DataFrame) -> dict[str, str]:
    """sn_tok -> surname: counts and group profiles matched with the reference surnames."""
    obs = _observed(con, "sn_tok")
    total = con.execute("SELECT count(*) FROM pp").fetchall()[0][0]
    exp = _expected_names(sur, [], total).set_index("name")
    # only tokens carried by at least two pseudo-persons: rarer ones are typos or hyphenated names
    return _assign(obs[obs["n"] >= 2], exp, weight=2.0)


def attack_dob(con, rng) -> dict[tuple[str, str], tuple[int, int]]:
    """(dob_month_tok, dob_day_tok) -> (month, day) from the swap structure and the calendar.

    dob_swap_tok is NULL exactly when the day is over 12, so day tokens split into 1-12 and
    13-31; a row whose dob_swap_tok equals its dob_tok has day = month, which pairs each day
    token of 1-12 with the month token of the same number; the three rarest day tokens of
    13-31 are 31, 30, 29; the month tokens never seen with day 31 are the 30-day months and
    February (never with 30); the education payload's year group splits September-December
    births from January-August ones. Within what stays indistinguishable, a seeded random pick.
    """
    days = con.execute("""SELECT dob_day_tok, count(*) FILTER (WHERE dob_swap_tok IS NULL) AS hi,
                          count(DISTINCT dob_tok) AS n FROM ids WHERE dob_tok IS NOT NULL GROUP BY 1 ORDER BY 1""").df()
    pair = dict(con.execute("""SELECT dob_day_tok, mode(dob_month_tok) FROM ids
                               WHERE dob_tok = dob_swap_tok GROUP BY 1""").fetchall())
    low = days[days["hi"] == 0]["dob_day_tok"].tolist()
    high = days[days["hi"] > 0].sort_values(["n", "dob_day_tok"])["dob_day_tok"].tolist()
    day_of = dict(zip(high[:3], (31, 30, 29)))
    rest = list(range(13, 29))
    rng.shuffle(rest)
    day_of.update(zip(high[3:], rest))
    d31 = [t for t, d in day_of.items() if d == 31]
    d30 = [t for t, d in day_of.items() if d == 30]
    months = con.execute(f"""SELECT i.dob_month_tok,
            count(*) FILTER (WHERE i.dob_day_tok IN ({','.join(f"'{t}'" for t in d31) or "''"})) AS n31,
            count(*) FILTER (WHERE i.dob_day_tok IN ({','.join(f"'{t}'" for t in d30) or "''"})) AS n30,
            avg(CASE WHEN e.record_token IS NULL THEN NULL
                     ELSE (CAST(left(e.academic_year, 4) AS INT) - i.birth_year - e.year_group) END) AS off
            FROM ids i LEFT JOIN pay_education e USING (record_token)
            WHERE i.dob_tok IS NOT NULL GROUP BY 1 ORDER BY 1""").df()
    off_split = months["off"].median()
    month_of = {}
    for _, m in months.iterrows():
        late = m["off"] < off_split      # born September-December: a year older for the year group
        if m["n30"] == 0:
            cands = [2]
        elif m["n31"] == 0:
            cands = [9, 11] if late else [4, 6]
        else:
            cands = [10, 12] if late else [1, 3, 5, 7, 8]
        month_of[m["dob_month_tok"]] = cands
    used: set[int] = set()
    for tok, cands in sorted(month_of.items(), key=lambda kv: (len(kv[1]), kv[0])):
        free = [c for c in cands if c not in used] or cands
        month_of[tok] = int(rng.choice(free))
        used.add(month_of[tok])
    inverse = {tok: m for tok, m in month_of.items()}
    for dtok in low:
        mtok = pair.get(dtok)
        day_of[dtok] = inverse.get(mtok, int(rng.integers(1, 13)))
    return {"month": month_of, "day": day_of}


def research_pay(ws: Path, key=None):
    """``research/person_year`` (person, year, pay > 0) as the attacker reads it: with a research subkey
    (``key``), or without one as DuckDB and Arrow read the file; None when nothing can be read."""
    import duckdb
    import pyarrow.parquet as pq

    from linkage.pseudonymise.store import read_research

    f = ws / "research" / "person_year.parquet"
    if not f.exists():
        return None
    if key is not None:
        t = read_research(ws, key, "person_year", ["person_id", "year", "paye_pay"])
    else:
        t = None
        for read in (lambda: pq.read_table(f, columns=["person_id", "year", "paye_pay"]),
                     lambda: connect().execute(f"SELECT person_id, year, paye_pay FROM {read_literal(f)}").to_arrow_table()):
            try:
                t = read()
                break
            except (duckdb.Error, OSError):
                continue
        if t is None:
            return None
    df = t.to_pandas().rename(columns={"person_id": "person", "paye_pay": "pay"})
    return df[df["pay"] > 0].reset_index(drop=True)


def attack_pay_join(con, py: pd.DataFrame | None) -> pd.DataFrame:
    """Research person-years (``py``, from :func:`research_pay`) joined to payload earnings on exact (year, pay).

    Returns the (research person, record token) pairs where a person-year's pay matches
    exactly one earnings row of that tax year.
    """
    if py is None:
        return pd.DataFrame(columns=["person", "record_token"])
    _research_pay(con, py)
    return con.execute("""
        WITH e AS (SELECT CAST(left(CAST(tax_year AS VARCHAR), 4) AS INT) AS year, pay, record_token
                   FROM pay_earnings),
             m AS (SELECT r.person, r.year, e.record_token, count(*) OVER (PARTITION BY r.person, r.year) AS k
                   FROM r_py r JOIN e USING (year, pay))
        SELECT DISTINCT person, record_token FROM m WHERE k = 1""").df()


def _research_pay(con, py: pd.DataFrame) -> None:
    con.register("r_py_df", py[["person", "year", "pay"]])
    con.execute("CREATE OR REPLACE TABLE r_py AS SELECT * FROM r_py_df")
    con.unregister("r_py_df")


def attack_cross_project(con, py: pd.DataFrame | None) -> tuple[int, int]:
    """Two projects' research extracts joined on pay (research/ only: no payload).

    A second project's extract holds the same persons' same (year, pay) values under other
    person ids. Returns the research persons with >= 2 (year, pay) values held by no other
    person-year (each such value names the same person in both extracts), and those whose
    whole (year, pay) sequence (>= 2 years) is unique (the whole sequence joins).
    """
    if py is None:
        return 0, 0
    _research_pay(con, py)
    values = con.execute("""WITH u AS (SELECT year, pay FROM r_py GROUP BY ALL HAVING count(*) = 1)
                            SELECT count(*) FROM (SELECT person FROM r_py JOIN u USING (year, pay)
                                                  GROUP BY person HAVING count(*) >= 2)""").fetchall()[0][0]
    sequences = con.execute("""WITH s AS (SELECT person, string_agg(year || ':' || pay, ',' ORDER BY year) AS sig
                                          FROM r_py GROUP BY person HAVING count(*) >= 2)
                               SELECT count(*) FROM (SELECT sig FROM s GROUP BY sig HAVING count(*) = 1)""").fetchall()[0][0]
    return values, sequences


NEAREST_BASE = 5000


def attack_cross_project_nearest(py: pd.DataFrame | None, base: int = NEAREST_BASE, chunk: int = 256) -> int:
    """Nearest-neighbour pay sequences across two projects' extracts that differ.

    The second project's extract holds the same persons under other ids, with pay rounded
    to ``base`` pounds (not the first extract's unit) and each person's last year missing
    (a shorter data window), so no whole sequence is equal. The attacker rounds the first
    extract's pay to ``base`` too and names each of its persons after the second extract's
    person at the smallest root-mean-square pay distance over the years both hold (two or
    more), preferring more common years. Returns the persons so named rightly, with a
    unique nearest neighbour.
    """
    if py is None or py.empty:
        return 0
    persons = pd.Index(py["person"].unique())
    years = pd.Index(sorted(py["year"].unique()))
    i, j = persons.get_indexer(py["person"]), years.get_indexer(py["year"])
    n, y = len(persons), len(years)

    def coarse(pay):
        return np.maximum(np.round(pay / base), 1) * base / 1000.0   # in GBP 1,000s

    a, ma = np.zeros((n, y)), np.zeros((n, y))
    a[i, j], ma[i, j] = coarse(py["pay"].to_numpy(float)), 1.0
    last = py.groupby("person")["year"].transform("max").to_numpy() == py["year"].to_numpy()
    b, mb = np.zeros((n, y)), np.zeros((n, y))
    b[i[~last], j[~last]], mb[i[~last], j[~last]] = coarse(py["pay"].to_numpy(float)[~last]), 1.0
    b2 = (b * b).T
    hit = 0
    for lo in range(0, n, chunk):
        ac, mc = a[lo:lo + chunk], ma[lo:lo + chunk]
        common = mc @ mb.T
        sq = (ac * ac) @ mb.T + mc @ b2 - 2.0 * (ac @ b.T)
        score = np.where(common >= 2, np.sqrt(np.maximum(sq, 0.0) / np.maximum(common, 1)) - 0.01 * common, np.inf)
        two = np.partition(score, 1, axis=1)[:, :2]
        best = score.argmin(axis=1)
        own = np.arange(lo, lo + len(ac))
        ok = (best == own) & np.isfinite(two[:, 0]) & (two[:, 0] < two[:, 1] - 1e-9)
        hit += int(ok.sum())
    return hit


# -- scoring (the key is used here only, to decrypt the crosswalk) -------------------------------

def _score_table(con, ws: Path, key_file: str) -> None:
    key = load_master_key(key_file, workspace=ws)
    crosswalk_table(con, ws / "pseudonymised" / CROSSWALK_FILE, key, "xw",
                    ("record_token", "source", "row", "record_id"))
    truth = ws / "truth"
    con.execute(f"""CREATE TABLE scored AS SELECT i.*, x.row AS landing_row, t.person_id, upper(p.forename) AS fn,
                    upper(p.surname) AS sn, upper(p.surname_after_change) AS sn2, p.sex, p.dob
                    FROM ids i JOIN xw x USING (record_token)
                    JOIN {read_literal(truth / 'source_rows.parquet')} t ON t.source = x.source AND t.record_id = x.record_id
                    JOIN {read_literal(truth / 'persons.parquet')} p USING (person_id)""")


def _research_truth(con, ws: Path, key_file: str) -> None:
    """research person_id -> true person: the project's keyed id of each linked person (as assemble makes it)."""
    from linkage.encodings import Tokeniser
    from linkage.keys import project_key

    project = json.loads((ws / "research" / "metadata.json").read_text())["project"]
    secret = project_key(load_master_key(key_file, workspace=ws), project)
    rec = con.execute(f"""SELECT r.person_key, mode(s.person_id) AS person_id
                          FROM {read_literal(ws / 'linked' / 'records.parquet')} r JOIN scored s USING (record_token)
                          GROUP BY 1""").df()
    rec["person"] = Tokeniser(secret, "person").many(rec["person_key"].tolist())
    con.register("research_truth_df", rec[["person", "person_id"]])
    con.execute("CREATE OR REPLACE TABLE research_truth AS SELECT * FROM research_truth_df")


def _sequence_join_sql(band: str) -> str:
    """Research persons whose (year, banded pay) sequence matches exactly one payload pseudo-person's
    (earnings rows grouped by name, date-of-birth and sex tokens), and that pseudo-person is theirs."""
    return f"""
        WITH e AS (SELECT CAST(left(CAST(p.tax_year AS VARCHAR), 4) AS INT) AS year, p.pay, i.fn_tok, i.sn_tok,
                          i.dob_tok, i.sex_tok, s.person_id
                   FROM pay_earnings p JOIN ids i USING (record_token) JOIN scored s USING (record_token)),
             pe AS (SELECT fn_tok, sn_tok, dob_tok, sex_tok, year, sum(pay) AS pay, mode(person_id) AS person_id
                    FROM e GROUP BY ALL),
             pb AS (SELECT *, {band} AS b FROM pe),
             psig AS (SELECT string_agg(year || ':' || b, ',' ORDER BY year) AS sig, mode(person_id) AS person_id
                      FROM pb GROUP BY fn_tok, sn_tok, dob_tok, sex_tok HAVING count(*) >= 2),
             pu AS (SELECT sig, any_value(person_id) AS person_id FROM psig GROUP BY sig HAVING count(*) = 1),
             rb AS (SELECT person, year, {band} AS b FROM r_py),
             rsig AS (SELECT person, string_agg(year || ':' || b, ',' ORDER BY year) AS sig FROM rb GROUP BY person
                      HAVING count(*) >= 2),
             ru AS (SELECT sig, any_value(person) AS person FROM rsig GROUP BY sig HAVING count(*) = 1)
        SELECT count(*) FROM ru JOIN pu USING (sig) JOIN research_truth t ON t.person = ru.person
        WHERE t.person_id = pu.person_id"""


def _map_sql(con, name: str, mapping: dict) -> None:
    con.execute(f"CREATE OR REPLACE TABLE {name} (k VARCHAR, v VARCHAR)")
    if mapping:
        con.executemany(f"INSERT INTO {name} VALUES (?, ?)", [(str(k), str(v)) for k, v in mapping.items()])


TOKEN_ATTACKS = (
    ("row order: identifiers row i is landing row i", "source row"),
    ("row order: payload row i is identifiers row i", "record token"),
    ("sex token: higher median pay is M", "sex"),
    ("forename initial token: frequency alignment by sex", "forename initial"),
    ("forename token: frequency alignment by sex, initial, ethnicity", "forename"),
    ("whole Bloom-filter pattern frequency (fn_bf)", "forename"),
    ("graph matching: fn_bf Dice to 300 frequency anchors vs cleartext bigram Dice", "forename"),
    ("surname token: frequency alignment by name group", "surname"),
    ("full name + birth year (clear) + sex", "name, birth year, sex"),
    ("date of birth from day/month/swap tokens + birth year", "full date of birth"),
    ("research person-years joined to payload earnings on exact (year, pay)", "record token of a research person"),
)


def _linked_order(con, ws: Path, add, n_rows: int) -> None:
    """Row order of every linked/ file holding record tokens against the landing order (``landing_rank``)."""
    one = lambda sql: con.execute(sql).fetchall()[0]   # noqa: E731
    for f in sorted((ws / "linked").glob("*.parquet")):
        cols = [c for (c,) in con.execute(f"SELECT name FROM parquet_schema({read_literal(f)})").fetchall()]
        if "record_token" not in cols:
            continue
        # the file's next row is the next landing row of the same source: order carried over
        hit = one(f"""WITH x AS (SELECT record_token, row_number() OVER () AS pos FROM {read_literal(f)}),
                           y AS (SELECT l.source, l.r, lead(l.source) OVER (ORDER BY x.pos) AS ns,
                                        lead(l.r) OVER (ORDER BY x.pos) AS nr
                                 FROM x JOIN landing_rank l USING (record_token))
                      SELECT count(*) FROM y WHERE ns = source AND nr = r + 1""")[0]
        add(f"row order: {f.relative_to(ws)}: the next row is the next landing row", "source row", hit, n_rows)


def _add_cross_project(con, ws: Path, add, py: pd.DataFrame | None, persons: int, note: str = "") -> None:
    """The cross-project joins on ``py`` (None: research/ unreadable, every join reads nothing)."""
    values, sequences = attack_cross_project(con, py)
    nearest = attack_cross_project_nearest(py)
    rounding = json.loads((ws / "research" / "metadata.json").read_text())["settings"].get("research_pay_rounding", 0)
    pay = f"pay rounded to GBP {rounding:,}" if rounding else "exact pay"
    none = "no input: 0 rows of research/ readable" if py is None else ""
    add(f"two projects' research extracts joined on >= 2 (year, pay) values ({pay})", "person across projects",
        values, max(persons, 1), none or note + "a (year, pay) value held by one person-year only, twice or more")
    add(f"two projects' research extracts joined on the whole (year, pay) sequence ({pay})", "person across projects",
        sequences, max(persons, 1), none or note + "a person's sequence of >= 2 (year, pay) values held by no other person")
    add(f"nearest-neighbour pay sequences: the second extract with pay rounded to GBP {NEAREST_BASE:,} and one "
        "year fewer", "person across projects", nearest, max(persons, 1),
        none or note + "first extract's pay rounded the same way; nearest by RMS over >= 2 common years, unique "
                       "and right")


def _research_persons(ws: Path, key_file: str) -> int:
    """Scoring only: the persons of research/person_year (decrypted with the master key)."""
    from linkage.pseudonymise.store import read_research

    if not (ws / "research" / "person_year.parquet").exists():
        return 0
    t = read_research(ws, load_master_key(key_file, workspace=ws), "person_year", ["person_id"])
    return len(set(t.column("person_id").to_pylist()))


def run_keyless(ws: Path, key_file: str) -> dict:
    """What an attacker without any key gets: the zone files read by DuckDB and Arrow (identifiers/,
    payload/ and research/ are encrypted), and the attacks on what stays in clear (linked/ row order)."""
    t0 = time.perf_counter()
    con = connect()
    reads = keyless_reads(ws)
    n_rows = reads["identifiers"][1]
    results = []

    def add(attack, field, hit, of, note=""):
        results.append({"attack": attack, "field": field, "re_identified": hit, "of": of,
                        "share": hit / of if of else 0.0, "note": note})

    for zone, (got, held) in reads.items():
        where = "research/" if zone == "research" else f"pseudonymised/{zone}/"
        add(f"read {where} without the key (DuckDB, Arrow)", "readable row", got, held,
            "encrypted Parquet: footer, schema and pages")
    readable = reads["identifiers"][0] + reads["payload"][0]
    py = research_pay(ws)                       # as DuckDB and Arrow read it without a key: None
    research_persons = _research_persons(ws, key_file)
    for attack, field in TOKEN_ATTACKS:
        of = research_persons if field == "record token of a research person" else n_rows
        add(attack, field, 0 if not readable else of, of,
            "no input: 0 rows of identifiers/ and payload/ readable" if not readable else "zone readable")
    key = load_master_key(key_file, workspace=ws)   # scoring only: the landing order of each token
    crosswalk_table(con, ws / "pseudonymised" / CROSSWALK_FILE, key, "xw", ("record_token", "source", "row"))
    con.execute("""CREATE TABLE landing_rank AS SELECT record_token, source,
                   row_number() OVER (PARTITION BY source ORDER BY row) - 1 AS r FROM xw""")
    _linked_order(con, ws, add, n_rows)
    _add_cross_project(con, ws, add, py, research_persons)
    persons = con.execute(f"SELECT count(*) FROM {read_literal(ws / 'truth' / 'persons.parquet')}").fetchall()[0][0]
    return {"workspace_rows": n_rows, "persons": persons, "seed": None,
            "attack_seconds": round(time.perf_counter() - t0, 1), "results": results, "linkage": _linkage(ws)}


def _linkage(ws: Path) -> dict:
    evaluation = ws / "reports" / "evaluation.json"
    if not evaluation.exists():
        return {}
    ev = json.loads(evaluation.read_text())
    return {k: ev[k] for k in LINKAGE_FIGURES if isinstance(ev.get(k), (int, float))}


def run(ws: Path, key_file: str, seed: int = 16) -> dict:
    """The attacks as a party holding the zone subkeys (``zone:identifiers``, ``zone:payload`` and two
    projects' ``zone:research:<project>``) but not the master key: the residual risk of leaked zone keys
    (or of zones written before encryption)."""
    from linkage.pseudonymise.store import research_key, research_project, zone_key

    rng = np.random.default_rng(seed)
    con = connect()
    master = load_master_key(key_file, workspace=ws)
    ids_key, pay_key = zone_key(master, "identifiers"), zone_key(master, "payload")
    res_key = research_key(master, research_project(ws)) if (ws / "research" / "metadata.json").exists() else None
    del master                      # the attacks below hold the zone subkeys only
    t0 = time.perf_counter()
    _load(con, ws, ids_key, pay_key)
    fore, sur = _reference()
    sex = attack_sex(con)
    initial = attack_initial(con, sex, fore)
    forename = attack_forename(con, sex, initial, fore)
    forename_bf = attack_forename(con, sex, initial, fore, column="fn_bf")
    forename_graph = attack_forename_graph(con, forename_bf, sex, initial, fore)
    surname = attack_surname(con, sur)
    dob = attack_dob(con, rng)
    py = research_pay(ws, res_key) if res_key is not None else None
    pairs = attack_pay_join(con, py)
    seconds_attack = time.perf_counter() - t0

    _score_table(con, ws, key_file)
    for name, mapping in (("g_sex", sex), ("g_ini", initial), ("g_fn", forename), ("g_fnbf", forename_bf), ("g_fngraph", forename_graph),
                          ("g_sn", surname), ("g_month", dob["month"]), ("g_day", dob["day"])):
        _map_sql(con, name, mapping)
    one = lambda sql: con.execute(sql).fetchall()[0]   # noqa: E731
    n_rows = one("SELECT count(*) FROM scored")[0]
    results = []

    def add(attack, field, hit, of, note=""):
        results.append({"attack": attack, "field": field, "re_identified": hit, "of": of,
                        "share": hit / of if of else 0.0, "note": note})

    # row order: identifiers row i = landing row i; payload row i = identifiers row i
    # landing_row is 1-based; quarantined rows leave gaps, so compare ranks within the source
    hit = one("""SELECT count(*) FROM (SELECT pos, row_number() OVER (PARTITION BY source ORDER BY landing_row) - 1
                                      AS landing_rank FROM scored) WHERE pos = landing_rank""")[0]
    add("row order: identifiers row i is landing row i", "source row", hit, n_rows)
    pay_hit = sum(one(f"""SELECT count(*) FROM pay_{s} p JOIN ids i ON i.source = '{s}' AND i.pos = p.pos
                          AND i.record_token = p.record_token""")[0] for s in SOURCES)
    add("row order: payload row i is identifiers row i", "record token", pay_hit, n_rows)
    # the same for every later file holding record tokens (linked/), within each source
    con.execute("""CREATE TABLE landing_rank AS SELECT record_token, source,
                   row_number() OVER (PARTITION BY source ORDER BY landing_row) - 1 AS r FROM scored""")
    _linked_order(con, ws, add, n_rows)
    hit, of = one("""SELECT count(*) FILTER (WHERE g.v = s.sex), count(*) FROM scored s
                     JOIN g_sex g ON g.k = s.sex_tok""")
    add("sex token: higher median pay is M", "sex", hit, of)
    hit, of = one("""SELECT count(*) FILTER (WHERE g.v = left(s.fn, 1)), count(*) FROM scored s
                     JOIN g_ini g ON g.k = s.fn_initial_tok""")
    add("forename initial token: frequency alignment by sex", "forename initial", hit, of)
    of = one("SELECT count(*) FROM scored WHERE fn_tok IS NOT NULL")[0]
    hit = one("SELECT count(*) FROM scored s JOIN g_fn g ON g.k = s.fn_tok WHERE g.v = s.fn")[0]
    add("forename token: frequency alignment by sex, initial, ethnicity", "forename", hit, of)
    hit = one("SELECT count(*) FROM scored s JOIN g_fnbf g ON g.k = s.fn_bf WHERE g.v = s.fn")[0]
    add("whole Bloom-filter pattern frequency (fn_bf)", "forename", hit, of)
    hit = one("SELECT count(*) FROM scored s JOIN g_fngraph g ON g.k = s.fn_bf WHERE g.v = s.fn")[0]
    add("graph matching: fn_bf Dice to 300 frequency anchors vs cleartext bigram Dice", "forename", hit, of,
        "every filter guessed: anchors by frequency, the rest by similarity")
    of = one("SELECT count(*) FROM scored WHERE sn_tok IS NOT NULL")[0]
    hit = one("""SELECT count(*) FROM scored s JOIN g_sn g ON g.k = s.sn_tok
                 WHERE g.v = s.sn OR g.v = s.sn2""")[0]
    add("surname token: frequency alignment by name group", "surname", hit, of)
    # full name + clear birth year + sex, and persons whose combination is unique (singled out)
    con.execute(f"""CREATE TABLE fullname AS SELECT s.person_id FROM scored s
                    JOIN g_fn f ON f.k = s.fn_tok JOIN g_sn n ON n.k = s.sn_tok JOIN g_sex x ON x.k = s.sex_tok
                    WHERE f.v = s.fn AND (n.v = s.sn OR n.v = s.sn2) AND x.v = s.sex""")
    hit = one("SELECT count(*) FROM fullname")[0]
    uniq = one(f"""WITH p AS (SELECT person_id, count(*) OVER (PARTITION BY upper(forename), upper(surname),
                                   birth_year, sex) AS k FROM {read_literal(ws / 'truth' / 'persons.parquet')})
                   SELECT count(DISTINCT f.person_id) FROM fullname f JOIN p USING (person_id) WHERE p.k = 1""")[0]
    persons = one(f"SELECT count(*) FROM {read_literal(ws / 'truth' / 'persons.parquet')}")[0]
    add("full name + birth year (clear) + sex", "name, birth year, sex", hit, n_rows)
    add("full name + birth year + sex: persons singled out", "person", uniq, persons,
        "unique (forename, surname, birth year, sex) in the population")
    hit, of = one("""SELECT count(*) FILTER (WHERE m.v::INT = month(s.dob) AND d.v::INT = day(s.dob)
                                            AND s.birth_year = year(s.dob)), count(*)
                     FROM scored s JOIN g_month m ON m.k = s.dob_month_tok JOIN g_day d ON d.k = s.dob_day_tok""")
    add("date of birth from day/month/swap tokens + birth year", "full date of birth", hit, of)
    # pay join: a research person re-identified when the record tokens found for them all
    # belong to one true person (truth, through the crosswalk)
    research_persons = _research_persons(ws, key_file)
    con.register("joined", pairs)
    _research_truth(con, ws, key_file)
    hit = one("""SELECT count(*) FROM (SELECT j.person FROM joined j JOIN scored s USING (record_token)
                                       JOIN research_truth t ON t.person = j.person
                                       GROUP BY j.person HAVING bool_and(s.person_id = t.person_id))""")[0]
    add("research person-years joined to payload earnings on exact (year, pay)", "record token of a research person",
        hit, max(research_persons, 1), "research/person_year.parquet; a person counted when every token found is theirs")
    for label, band in (("pay rounded to the nearest 1,000", "round(pay, -3)"),
                        ("pay as its decile within the year", "ntile(10) OVER (PARTITION BY year ORDER BY pay)")):
        hit = one(_sequence_join_sql(band))[0]
        add(f"what if research pay were {label}: pay sequences joined to payload earnings",
            "research person", hit, max(research_persons, 1),
            "each person's (year, band) sequence equal to one pseudo-person's in the payload and to no other")
    _add_cross_project(con, ws, add, py, research_persons,
                       "the attacker holds both projects' research subkeys; ")
    linkage = _linkage(ws)
    return {"workspace_rows": n_rows, "persons": persons, "seed": seed,
            "attack_seconds": round(seconds_attack, 1), "results": results, "linkage": linkage}


def _markdown(report: dict, label: str) -> str:
    lines = [f"## {label}", "",
             f"{report['workspace_rows']:,} identifier rows, {report['persons']:,} persons; attacks took "
             f"{report['attack_seconds']} s (seed {report['seed']})"
             + (f"; run {report['run']}" if report.get("run") else "") + ".", "",
             "| attack | field | re-identified | of | share | goal | met |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        lines.append(f"| {r['attack']} | {r['field']} | {r['re_identified']:,} | {r['of']:,} | "
                     f"{100 * r['share']:.2f}% | < {100 * GOAL:.0f}% | {'yes' if r['share'] < GOAL else 'no'} |"
                     + (f" {r['note']}" if r["note"] else ""))
    if report.get("linkage"):
        lines += ["", "Linkage accuracy of the same workspace (`reports/evaluation.json`):", "",
                  "| " + " | ".join(report["linkage"]) + " |", "|" + "---:|" * len(report["linkage"]),
                  "| " + " | ".join(f"{v:.4f}" for v in report["linkage"].values()) + " |"]
    return "\n".join(lines) + "\n"


KEYLESS_LABEL = "keyless view (this code: identifiers/, payload/ and research/ encrypted at rest, research pay rounded)"
ZONE_KEYS_LABEL = ("zone-keys view (residual: the zone subkeys held - identifiers, payload and two projects' "
                   "research - not the master key)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--key-file", required=True, help="used only to score (crosswalk -> truth), never by an attack")
    ap.add_argument("--label", default=None, help="label of a single view's run (default: the view's own)")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--view", choices=("both", "keyless", "zone-keys"), default="both",
                    help="keyless: an attacker with no key; zone-keys: one holding the zones' subkeys "
                         "(not the master key), the documented residual risk; both (default): the two views "
                         "of one workspace in one run, replacing every earlier run but those labelled 'before'")
    args = ap.parse_args(argv)
    reports = {}
    if args.view in ("both", "zone-keys"):
        reports[args.label if args.view != "both" and args.label else ZONE_KEYS_LABEL] = \
            run(args.workspace, args.key_file, args.seed)
    if args.view in ("both", "keyless"):
        reports[args.label if args.view != "both" and args.label else KEYLESS_LABEL] = \
            run_keyless(args.workspace, args.key_file)
    for label, report in reports.items():
        report["run"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(_markdown(report, label))
    RESULTS.mkdir(exist_ok=True)
    out_json = RESULTS / "privacy.json"
    runs = json.loads(out_json.read_text()) if out_json.exists() else {}
    if args.view == "both":
        runs = {k: v for k, v in runs.items() if k.startswith("before")}
    runs.update(reports)
    out_json.write_text(json.dumps(runs, indent=2) + "\n")
    md = ["# Re-identification attacks on the zones after pseudonymisation (`python -m bench.privacy`)", "",
          "Goal: every attack below 1% of records in every zone a keyless party can hold (issue 16). Scoring "
          "decrypts the crosswalk (and research/) with the key to find each row's true person in truth/; no "
          "attack uses the key.",
          "", "Views: `--view keyless` is an attacker holding every zone after pseudonymisation and no key "
          "(`pseudonymised/identifiers/`, `payload/` and `research/` are encrypted at rest); `--view zone-keys` "
          "is the documented residual risk, an attacker who also holds the zone subkeys (`zone:identifiers`, "
          "`zone:payload`, and two projects' `zone:research:<project>`) but not the master key, so reads the "
          "zones as they were before encryption. The default (`--view both`) runs the two views on one "
          "workspace in one run. Runs labelled 'before' are from earlier code (exact research pay, zones in clear).",
          ""]
    md += [_markdown(r, lbl) for lbl, r in runs.items()]
    (RESULTS / "privacy.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
