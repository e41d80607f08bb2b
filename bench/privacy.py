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
* sex token: the ``sex_tok`` whose records have the higher median pay is M (of many tokens, the upper
  half); with context-keyed tokens (``dobc_tok`` present), the same within each date-of-birth context;
  and from the benefits payload: Child Benefit claimants are F, the other adult of their couple's claims M,
  other couples by pay (and the other sex token of a context holding two). A zone that seals sex
  (``sex_seal``, no ``sex_tok``) gets the payload inference only, per name and date-of-birth tokens
  (:data:`SEX_STAND_IN`, the sex every later attack conditions on), and a row counting the records
  whose seal another record shares;
* forename-initial token: frequency alignment (per sex) with the reference lists;
* forename token: frequency alignment within (sex, initial) cells, with the token's
  ethnic-group profile (education payload) beside the reference's name groups
  (minimum-cost assignment);
* surname token: the same over all surnames, by name group;
* whole Bloom-filter patterns: the forename attack with ``fn_bf`` in place of ``fn_tok``;
* graph matching on Bloom-filter similarity: every other ``fn_bf`` named by its Dice with
  the 300 most frequent (anchored) filters against cleartext bigram Dice of candidate names;
* pattern mining: each bigram's profile over the bit positions, fitted on the 300 most frequent named
  filters, names every ``fn_bf`` by its nearest predicted filter;
* Bloom-filter weight: the bits a filter sets (which no permutation changes) against the weights of the
  reference names under random keys; and, where ``sn_swap_bf`` exists, the Dice of a record's ``fn_bf`` and
  ``sn_swap_bf`` (one key and, with context-keyed filters, one permutation) against the pairs' Dice;
* ``fn_tok``, ``sn_tok`` and ``name_ym_tok`` / ``name_yd_tok`` / ``name_md_tok`` (when present): records
  whose token is carried by more than one person, all that a frequency attack on them can use;
* full name + birth year (clear) + sex: rows with all of them right, and persons whose
  combination is unique in the population (singled out);
* date of birth: from ``dob_day_tok``, ``dob_month_tok``, ``dob_swap_tok`` and birth year;
* pay join: research person-years joined to payload earnings on exact (year, pay);
* cross-project joins: two projects' research extracts joined on (year, pay) values, on
  whole pay sequences, and by nearest-neighbour pay sequences when the second extract
  differs (coarser pay, one year fewer).

Guesses at a value are scored beyond the blind guess: re-identified = records guessed right (the
blind guess standing in where the attack names nothing) minus records the field's most common value
gets right, so a coin flip on sex or the commonest forename is not a re-identification. The attacks read
whichever encodings the workspace has: today's per-value ones or the context-keyed ones of issue 16.

Three views, one workspace, one run (``--view all``): keyless; a linkage operator holding the
identifiers subkey only (the tokens and filters a PPRL linkage unit is given, no payload and no
research extract: every attack that needs the payload finds it empty); and every zone subkey but
the master key (the residual of a key leak). The public FEBRL files are linked in the same run
(:func:`bench.public.measure`, hhlink and the cleartext Splink reference), so the linkage
figures on public data sit beside the attacks on the encodings built the same way.

``research/`` is encrypted at rest under a per-project subkey (``zone:research:<project>``):
the keyless view reads none of it; the zone-keys view gives the attacker the research
subkeys of two projects as well, the residual risk of the cross-project joins.

Usage:
    python -m bench.privacy WORKSPACE --key-file KEY [--view all|keyless|operator|zone-keys] [--label before]
        [--public | --no-public]
        [--results DIR]
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
from linkage.link.linked_records import records_relation
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


#: identifier columns every attack reads, and those read when the workspace has them (the
#: context-keyed encodings of issue 16 add ``dobc_tok`` and the ``name_*_tok`` columns)
ID_COLUMNS = ["record_token", "source", "year", "birth_year", "fn_tok", "sn_tok", "fn_initial_tok",
              "dob_tok", "dob_day_tok", "dob_month_tok", "dob_swap_tok", "fn_bf"]
OPTIONAL_COLUMNS = ["sex_tok", "sex_seal", "sn_bf", "sn_swap_bf", "dobc_tok", "name_ym_tok", "name_yd_tok",
                    "name_md_tok"]
#: with no ``sex_tok`` in the zone (sex sealed), the attacks' ``sex_tok`` is this per-record key: the
#: attacker's sex per pseudo-person (name and date-of-birth tokens) comes from the payload alone
SEX_STAND_IN = "coalesce(fn_tok, '') || '|' || coalesce(sn_tok, '') || '|' || coalesce(dob_tok, '')"
FILTER_COLUMNS = ("fn_bf", "sn_bf", "sn_swap_bf")
NAME_DATE_TOKENS = {"name_ym_tok": "name + year and month of birth", "name_yd_tok": "name + year and day of birth",
                    "name_md_tok": "name + month and day of birth"}


def _load(con, ws: Path, ids_key, pay_key, payload_held: bool = True) -> list[str]:
    """The zones as a holder of the zone subkeys (not the master key) reads them, in file order.
    Returns the identifier columns read (``ID_COLUMNS`` and the ``OPTIONAL_COLUMNS`` the files have).

    Without ``payload_held`` the ``pay_<source>`` tables are empty (the bench reads their columns
    only, so the attacks' SQL runs): every attack that needs the payload finds nothing."""
    from linkage.pseudonymise.store import read_encrypted, read_encrypted_schema

    held = set(read_encrypted_schema(ws / "pseudonymised" / "identifiers" / f"{SOURCES[0]}.parquet",
                                     ids_key, "identifiers").names)
    cols = ID_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in held]
    as_hex = ", ".join(f"hex({c}) AS {c}" for c in FILTER_COLUMNS if c in cols)
    stand_in = "" if "sex_tok" in cols else f", {SEX_STAND_IN} AS sex_tok"
    parts = []
    for s in SOURCES:
        con.register(f"ids_{s}_arrow", read_encrypted(ws / "pseudonymised" / "identifiers" / f"{s}.parquet",
                                                      ids_key, "identifiers", cols))
        parts.append(f"SELECT row_number() OVER () - 1 AS pos, * REPLACE ({as_hex}){stand_in} FROM ids_{s}_arrow")
        con.register(f"pay_{s}_arrow", read_encrypted(ws / "pseudonymised" / "payload" / f"{s}.parquet",
                                                      pay_key, "payload"))
        con.execute(f"CREATE TABLE pay_{s} AS SELECT row_number() OVER () - 1 AS pos, * FROM pay_{s}_arrow"
                    + ("" if payload_held else " LIMIT 0"))
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
    return cols


def reference_lists() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The attacker's public frequency tables: the generator's forename and surname lists (best case)."""
    fore = pd.read_csv(REFERENCE / "forenames.csv")
    sur = pd.read_csv(REFERENCE / "surnames.csv")
    for t, by in ((fore, ["sex", "group"]), (sur, ["group"])):
        t["name"] = t["name"].str.upper()
        t["p"] = t["weight"] / t.groupby(by)["weight"].transform("sum")
    return fore, sur


# -- attacks: each returns guesses keyed by something the attacker holds -------------------------

def attack_sex(con) -> dict[str, str]:
    """sex_tok -> 'M' / 'F': the tokens whose earnings records have the higher median pay are M (of two
    tokens, the higher; of many, as context-keyed tokens are, the upper half)."""
    med = con.execute("""SELECT i.sex_tok, median(p.pay) FROM ids i JOIN pay_earnings p USING (record_token)
                         WHERE i.sex_tok IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1""").fetchall()
    half = max(len(med) // 2, 1)
    return {tok: ("M" if i < half else "F") for i, (tok, _) in enumerate(med)}


def attack_sex_context(con) -> dict[str, str]:
    """sex_tok -> 'M' / 'F' within each date-of-birth context (``dobc_tok``), where context-keyed sex
    tokens take one or two values: of two tokens the one with the higher median pay is M; a context's
    only token is M when its median pay is above the median over all tokens. Tokens without earnings
    records get no guess (scoring gives them the blind guess)."""
    df = con.execute("""SELECT i.sex_tok AS tok, coalesce(any_value(i.dobc_tok), '') AS ctx, median(p.pay) AS pay
                        FROM ids i JOIN pay_earnings p USING (record_token)
                        WHERE i.sex_tok IS NOT NULL GROUP BY 1""").df()
    if df.empty:
        return {}
    n = df.groupby("ctx")["tok"].transform("size")
    top = df.groupby("ctx")["pay"].rank(ascending=False, method="first") == 1
    male = np.where(n >= 2, top, df["pay"] > df["pay"].median())
    return dict(zip(df["tok"], np.where(male, "M", "F")))


#: a person's records without the sex token: name and date-of-birth tokens together
PERSON_KEY = "{a}fn_tok || '|' || {a}sn_tok || '|' || {a}dob_tok"


def attack_sex_benefits(con, context: bool, key: str = "i.sex_tok") -> dict[str, str]:
    """sex_tok (or the records' ``key``) -> 'M' / 'F' from who claims what (payload/benefits, in clear)
    and pay, per token: ``key`` = ``PERSON_KEY`` infers sex from the payload with no sex token at all.

    Child Benefit is claimed by the mother (public knowledge): a Child Benefit claimant's token is F.
    The other adult of a couple's claim (claimant and partner of one ``claim_tok``) is of the other sex:
    M when the first is F; of a couple with neither known, the one with the higher median pay is M. The
    votes (3, 2 and 1 per record) are summed per token. With context-keyed tokens, a date-of-birth
    context holding two sex tokens holds both sexes: the other token of a named one gets the other sex."""
    b = con.execute(f"""SELECT {key} AS tok, p.claim_tok, p.role, p.benefit_type FROM pay_benefits p
                        JOIN ids i USING (record_token) WHERE {key} IS NOT NULL""").df()
    pay = dict(con.execute(f"""SELECT {key}, median(e.pay) FROM ids i JOIN pay_earnings e USING (record_token)
                               WHERE {key} IS NOT NULL GROUP BY 1""").fetchall())
    votes = [(t, "F", 3.0) for t in b.loc[(b["benefit_type"] == "CB") & (b["role"] == "claimant"), "tok"]]
    cb = pd.Series([t for t, _, _ in votes], dtype=object).value_counts().to_dict()
    a = b[b["role"] == "claimant"][["claim_tok", "tok"]]
    c = b[b["role"] == "partner"][["claim_tok", "tok"]]
    for x, y in a.merge(c, on="claim_tok", suffixes=("_a", "_b"))[["tok_a", "tok_b"]].itertuples(index=False):
        if x == y:
            continue
        if cb.get(x, 0) != cb.get(y, 0):       # the one with more Child Benefit claims is the mother
            votes.append((y if cb.get(x, 0) > cb.get(y, 0) else x, "M", 2.0))
        elif x in pay and y in pay and pay[x] != pay[y]:
            hi, lo = (x, y) if pay[x] > pay[y] else (y, x)
            votes += [(hi, "M", 1.0), (lo, "F", 1.0)]
    if not votes:
        return {}
    v = pd.DataFrame(votes, columns=["tok", "sex", "w"]).pivot_table(index="tok", columns="sex", values="w",
                                                                        aggfunc="sum", fill_value=0.0)
    v = v.reindex(columns=["F", "M"], fill_value=0.0)
    guess = dict(zip(v.index, np.where(v["M"] > v["F"], "M", "F")))
    if context and key == "i.sex_tok":
        ctx = con.execute("""SELECT coalesce(any_value(dobc_tok), '') AS ctx, list(DISTINCT sex_tok) AS toks
                             FROM ids WHERE sex_tok IS NOT NULL GROUP BY dobc_tok
                             HAVING count(DISTINCT sex_tok) = 2""").fetchall()
        for _, (t1, t2) in ctx:
            if (t1 in guess) != (t2 in guess):
                known, other = (t1, t2) if t1 in guess else (t2, t1)
                guess[other] = "M" if guess[known] == "F" else "F"
    return guess


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


def _observed(con, token: str, by: str = "", table: str = "pp") -> pd.DataFrame:
    """Per token: pseudo-persons carrying it, and the ethnic-group profile of those with education rows."""
    df = con.execute(f"""SELECT pp.{token} AS tok, {by or "NULL"} AS cell, e.ethnicity
                         FROM {table} pp LEFT JOIN pp_eth e USING (ppid) WHERE pp.{token} IS NOT NULL""").df()
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
    map_guesses(con, "a_sex", sex)
    map_guesses(con, "a_ini", initial)
    con.execute("""CREATE OR REPLACE TABLE pp_cell AS SELECT pp.*, s.v || ':' || i.v AS cell FROM pp
                   LEFT JOIN a_sex s ON s.k = pp.sex_tok LEFT JOIN a_ini i ON i.k = pp.ini""")
    obs = _observed(con, column, "pp.cell", "pp_cell")
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
    if len(a_idx) < 3:              # too few anchors to calibrate (context-keyed filters): the anchors only
        return dict(zip(df["fn_bf"].iloc[a_idx], a_names))
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


def _filter_bits(hexes) -> np.ndarray:
    """Unpacked bits (one row per filter) of hex-encoded filters of one length."""
    raw = np.frombuffer(b"".join(bytes.fromhex(h) for h in hexes), dtype=np.uint8)
    return np.unpackbits(raw.reshape(len(hexes), -1), axis=1)


def name_prior(ref: pd.DataFrame) -> pd.Series:
    """Each reference name's share of the population (group mix, both sexes)."""
    w = ref.assign(m=ref["p"] * ref["group"].map(GROUP_SHARE)).groupby("name")["m"].sum()
    return w / w.sum()


def _simulated_filters(names: list[str], params, rng, keys: int) -> list[np.ndarray]:
    """The reference names' filters under ``keys`` random keys of the documented parameters (the attacker
    knows the scheme, not the key): the key-independent part of a filter, e.g. its weight, is learnt here."""
    from linkage.encodings import BloomEncoder

    out = []
    for _ in range(keys):
        arr = BloomEncoder(rng.bytes(32), params).encode_many(names)
        out.append(_filter_bits([bytes(b).hex() for b in arr.to_pylist()]).astype(np.float32))
    return out


def bloom_params(ws: Path, column: str):
    """The documented parameters of a filter column (``pseudonymised/metadata.json``, in clear)."""
    from linkage.encodings import BloomParams
    from linkage.pseudonymise.store import zone_metadata

    meta = zone_metadata(ws / "pseudonymised")["bloom_filters"][column]
    return BloomParams(bits=meta["bits"], hashes=meta["hashes"], q=meta["q"], hardening=meta["hardening"],
                       level=meta.get("level_weight", False))


def attack_bloom_weight(con, column: str, prior: pd.Series, params, rng, keys: int = 8,
                        by_sex: dict[str, str] | None = None, fore: pd.DataFrame | None = None) -> dict[str, str]:
    """filter -> name from the filter's weight (bits set) alone, which no permutation of its bits changes.

    The weight grows with the name's q-gram count; the weight of each q-gram count under the scheme is
    learnt from the reference names' filters under ``keys`` random keys (mean, spread), and every observed filter
    is named by the most probable name given its weight (prior: the name's population share). With
    ``by_sex`` (sex_tok -> guessed sex) and the forename reference, a filter whose records' sex is guessed
    takes that sex's forename shares as its prior."""
    df = con.execute(f"SELECT DISTINCT {column} AS f FROM ids WHERE {column} IS NOT NULL ORDER BY 1").df()
    if df.empty:
        return {}
    names = prior.index.tolist()
    priors = {None: np.log(prior.to_numpy())}
    if by_sex:
        map_guesses(con, "a_wsex", by_sex)
        sex = dict(con.execute(f"""SELECT i.{column}, mode(g.v) FROM ids i JOIN a_wsex g ON g.k = i.sex_tok
                                   WHERE i.{column} IS NOT NULL GROUP BY 1""").fetchall())
        df["sex"] = df["f"].map(sex)
        for x in ("F", "M"):
            w = name_prior(fore[fore["sex"] == x]).reindex(names, fill_value=0.0) + 1e-9
            priors[x] = np.log((w / w.sum()).to_numpy())
    else:
        df["sex"] = None
    # a filter's expected weight depends on its distinct q-grams only: pooled per q-gram count over every
    # name and key, the mean and spread are stable, where one name's few draws are not
    sim = np.stack([b.sum(axis=1) for b in _simulated_filters(names, params, rng, keys)])
    grams = pd.Series([len(_bigrams(n)) for n in names])
    stats = pd.DataFrame({"g": np.tile(grams, keys), "w": sim.reshape(-1)}).groupby("g")["w"].agg(["mean", "std"])
    mu = grams.map(stats["mean"]).to_numpy()
    sd = np.maximum(grams.map(stats["std"]).fillna(stats["std"].mean()).to_numpy(), 1.0)
    weight = _filter_bits(df["f"]).sum(axis=1)
    values, inverse = np.unique(weight, return_inverse=True)
    like = -0.5 * ((values[:, None] - mu[None, :]) / sd[None, :]) ** 2 - np.log(sd)[None, :]
    guess = {}
    for x, logp in priors.items():
        rows = (df["sex"] == x).to_numpy() if x else df["sex"].isna().to_numpy()
        best = np.asarray(names)[(logp[None, :] + like).argmax(axis=1)]
        guess.update(zip(df["f"][rows], best[inverse[rows]]))
    return guess


def attack_bloom_pair(con, fore_prior: pd.Series, sur_prior: pd.Series, params, rng,
                      keys: int = 2) -> tuple[dict[str, str], dict[str, str]]:
    """(fn_bf|sn_swap_bf) -> (forename, surname) from the Dice of one record's two filters.

    ``sn_swap_bf`` is the surname under the forename key and, with context-keyed filters, the same
    permutation as the record's ``fn_bf``: their Dice is the Dice of the cleartext filters, which
    grows with the bigrams forename and surname share. The Dice of reference (forename, surname) pairs
    under the scheme is learnt under random keys; each record's pair of filters is named by the most
    probable pair given its Dice (rounded to 0.01; prior: the product of the names' shares)."""
    df = con.execute("""SELECT DISTINCT fn_bf, sn_swap_bf FROM ids
                        WHERE fn_bf IS NOT NULL AND sn_swap_bf IS NOT NULL ORDER BY 1, 2""").df()
    if df.empty:
        return {}, {}
    f, s = _filter_bits(df["fn_bf"]).astype(np.float32), _filter_bits(df["sn_swap_bf"]).astype(np.float32)
    observed = np.round(2 * (f * s).sum(axis=1) / np.maximum(f.sum(axis=1) + s.sum(axis=1), 1), 2)
    fn, sn = fore_prior.index.tolist(), sur_prior.index.tolist()
    sims = []
    for ff, ss in zip(_simulated_filters(fn, params, rng, keys), _simulated_filters(sn, params, rng, keys)):
        sims.append(2 * (ff @ ss.T) / (ff.sum(axis=1)[:, None] + ss.sum(axis=1)[None, :]))
    # a pair's expected Dice depends on the q-gram counts of both names and how many they share: pooled per
    # (count, count, shared) over every pair and key, as the weight attack pools per count
    grams = sorted({g for n in fn + sn for g in _bigrams(n)})
    col = {g: i for i, g in enumerate(grams)}

    def onehot(ns):
        x = np.zeros((len(ns), len(grams)), dtype=np.float32)
        for i, n in enumerate(ns):
            x[i, [col[g] for g in _bigrams(n)]] = 1.0
        return x
    xf, xs = onehot(fn), onehot(sn)
    cell = ((xf.sum(axis=1)[:, None] * 64 + xs.sum(axis=1)[None, :]) * 64 + xf @ xs.T).astype(np.int64)
    sim = pd.DataFrame({"c": np.tile(cell.reshape(-1), keys), "d": np.stack(sims).reshape(-1)})
    stats = sim.groupby("c")["d"].agg(["mean", "std"])
    flat = pd.Series(cell.reshape(-1))
    mu = flat.map(stats["mean"]).to_numpy().reshape(cell.shape)
    sd = np.maximum(flat.map(stats["std"]).fillna(stats["std"].mean()).to_numpy().reshape(cell.shape), 1e-3)
    prior = np.log(fore_prior.to_numpy())[:, None] + np.log(sur_prior.to_numpy())[None, :] - np.log(sd)
    values, inverse = np.unique(observed, return_inverse=True)
    best_f, best_s = [], []
    for v in values:
        i, j = np.unravel_index(int(np.argmax(prior - 0.5 * ((v - mu) / sd) ** 2)), mu.shape)
        best_f.append(fn[i])
        best_s.append(sn[j])
    k = (df["fn_bf"] + "|" + df["sn_swap_bf"]).tolist()
    return (dict(zip(k, np.asarray(best_f)[inverse])), dict(zip(k, np.asarray(best_s)[inverse])))


def attack_pattern_mining(con, anchors: dict[str, str], prior: pd.Series, n_anchors: int = 300,
                          chunk: int = 2048) -> dict[str, str]:
    """fn_bf -> forename from the bit positions each bigram sets (pattern mining across filters).

    The ``n_anchors`` most frequent filters keep their frequency-attack names; a least-squares fit on them
    gives each bigram its profile over the bit positions (what a position means is shared by every filter
    of one key: with per-context permutations, only within one context). Every filter is then named by the
    reference name whose predicted bits are nearest, weighed with the name's population share (Gaussian
    residuals, spread from the anchors' fit)."""
    df = con.execute("""SELECT fn_bf, count(*) AS n FROM pp WHERE fn_bf IS NOT NULL
                        GROUP BY 1 ORDER BY n DESC, fn_bf""").df()
    named = df[df["fn_bf"].isin(anchors)].head(n_anchors)
    if len(named) < 10:
        return {}
    names = prior.index.tolist()
    grams = sorted({g for n in [*names, *(anchors[h] for h in named["fn_bf"])] for g in _bigrams(n)})
    col = {g: i for i, g in enumerate(grams)}

    def design(ns) -> np.ndarray:
        x = np.zeros((len(ns), len(grams) + 1), dtype=np.float32)
        x[:, -1] = 1.0                                  # intercept: a position's base rate
        for i, n in enumerate(ns):
            x[i, [col[g] for g in _bigrams(n)]] = 1.0
        return x

    xa = design([anchors[h] for h in named["fn_bf"]])
    ba = _filter_bits(named["fn_bf"]).astype(np.float32)
    w = np.linalg.lstsq(xa, ba, rcond=None)[0]
    var = max(float(((ba - xa @ w) ** 2).mean()), 0.05)
    pred = design(names) @ w
    base = np.log(prior.to_numpy()) - (pred ** 2).sum(axis=1) / (2 * var)
    guess = {}
    for lo in range(0, len(df), chunk):
        part = df["fn_bf"].iloc[lo:lo + chunk]
        bits = _filter_bits(part).astype(np.float32)
        score = base[None, :] + (bits @ pred.T) / var      # -|b - p|^2 / 2var, less the constant |b|^2
        guess.update(zip(part, np.asarray(names)[score.argmax(axis=1)]))
    return guess


def attack_surname(con, sur: pd.DataFrame) -> dict[str, str]:
    """sn_tok -> surname: counts and group profiles matched with the reference surnames."""
    obs = _observed(con, "sn_tok")
    total = con.execute("SELECT count(*) FROM pp").fetchall()[0][0]
    exp = _expected_names(sur, [], total).set_index("name")
    # only tokens carried by at least two pseudo-persons: rarer ones are typos or hyphenated names
    return _assign(obs[obs["n"] >= 2], exp, weight=2.0)


def dob_structure(con) -> dict:
    """What :func:`attack_dob` reads from the zones, in one pass: each random draw reuses it.

    Day tokens split into 1-12 and 13-31 (``dob_swap_tok`` is NULL exactly when the day is over
    12); the three rarest of 13-31 are 31, 30, 29; a row whose ``dob_swap_tok`` equals its
    ``dob_tok`` has day = month, pairing a day token of 1-12 with a month token; per month token,
    its records on days 31 and 30 and the education payload's year-group offset."""
    days = con.execute("""SELECT dob_day_tok, count(*) FILTER (WHERE dob_swap_tok IS NULL) AS hi,
                          count(DISTINCT dob_tok) AS n FROM ids WHERE dob_tok IS NOT NULL GROUP BY 1 ORDER BY 1""").df()
    pair = dict(con.execute("""SELECT dob_day_tok, mode(dob_month_tok) FROM ids
                               WHERE dob_tok = dob_swap_tok GROUP BY 1""").fetchall())
    low = days[days["hi"] == 0]["dob_day_tok"].tolist()
    high = days[days["hi"] > 0].sort_values(["n", "dob_day_tok"])["dob_day_tok"].tolist()
    known = dict(zip(high[:3], (31, 30, 29)))
    tokens = {d: [t for t, v in known.items() if v == d] for d in (31, 30)}
    months = con.execute(f"""SELECT i.dob_month_tok,
            count(*) FILTER (WHERE i.dob_day_tok IN ({','.join(f"'{t}'" for t in tokens[31]) or "''"})) AS n31,
            count(*) FILTER (WHERE i.dob_day_tok IN ({','.join(f"'{t}'" for t in tokens[30]) or "''"})) AS n30,
            avg(CASE WHEN e.record_token IS NULL THEN NULL
                     ELSE (CAST(left(e.academic_year, 4) AS INT) - i.birth_year - e.year_group) END) AS off
            FROM ids i LEFT JOIN pay_education e USING (record_token)
            WHERE i.dob_tok IS NOT NULL GROUP BY 1 ORDER BY 1""").df()
    return {"low": low, "high": high, "known": known, "pair": pair, "months": months}


def attack_dob(con, rng, structure: dict | None = None) -> dict[str, dict]:
    """dob_month_tok -> month and dob_day_tok -> day from the swap structure and the calendar
    (:func:`dob_structure`).

    The month tokens never seen with day 31 are the 30-day months and February (never with 30);
    the education payload's year group, where the attacker holds it, splits September-December
    births from January-August ones; days 1-12 follow their paired month. Within what stays
    indistinguishable, a random pick from ``rng``: one draw is a lottery, so the benchmark
    scores the mean of many.
    """
    st = structure or dob_structure(con)
    day_of = dict(st["known"])
    rest = list(range(13, 29))
    rng.shuffle(rest)
    day_of.update(zip(st["high"][3:], rest))
    months = st["months"]
    off_split = months["off"].median()
    month_of = {}
    for _, m in months.iterrows():
        if pd.isna(m["off"]) or pd.isna(off_split):       # no year group (no education payload held)
            thirty, thirty_one = [4, 6, 9, 11], [1, 3, 5, 7, 8, 10, 12]
        elif m["off"] < off_split:                        # born September-December: a year older
            thirty, thirty_one = [9, 11], [10, 12]
        else:
            thirty, thirty_one = [4, 6], [1, 3, 5, 7, 8]
        month_of[m["dob_month_tok"]] = [2] if m["n30"] == 0 else thirty if m["n31"] == 0 else thirty_one
    used: set[int] = set()
    for tok, cands in sorted(month_of.items(), key=lambda kv: (len(kv[1]), kv[0])):
        free = [c for c in cands if c not in used] or cands
        month_of[tok] = int(rng.choice(free))
        used.add(month_of[tok])
    for dtok in st["low"]:
        mtok = st["pair"].get(dtok)
        day_of[dtok] = month_of.get(mtok, int(rng.integers(1, 13)))
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
                          FROM {records_relation(ws / 'linked')} r JOIN scored s USING (record_token)
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


def field_score(con, guess: str, key: str, truth: str, alt: str | None = None) -> tuple[int, int, int]:
    """(right, blind, of) over the scored records ``s`` with a ``key``: right when the guess (table ``guess``)
    for the record's key, or the blind guess where the attack made none, is the true value (``truth`` or
    ``alt``); blind: the records the best blind guess gets right, the most common true value named for all."""
    top = con.execute(f"SELECT mode({truth}) FROM scored s WHERE {key} IS NOT NULL").fetchall()[0][0]
    if top is None:
        return 0, 0, 0

    def ok(v: str) -> str:
        return f"({v} = {truth}" + (f" OR {v} = {alt})" if alt else ")")
    right, blind, of = con.execute(f"""SELECT count(*) FILTER (WHERE {ok("coalesce(g.v, $1)")}),
                                              count(*) FILTER (WHERE {ok("$1")}), count(*)
                                       FROM scored s LEFT JOIN {guess} g ON g.k = {key}
                                       WHERE {key} IS NOT NULL""", [str(top)]).fetchall()[0]
    return right, blind, of


def _pair_dice_correlation(con, limit: int = 20_000) -> float | None:
    """Scoring only: correlation of the Dice of a record's fn_bf and sn_swap_bf with the bigram Dice of its
    true forename and surname (distinct pairs, at most ``limit``)."""
    df = con.execute(f"""SELECT DISTINCT fn, sn, fn_bf, sn_swap_bf FROM scored
                         WHERE fn IS NOT NULL AND sn IS NOT NULL AND fn_bf IS NOT NULL AND sn_swap_bf IS NOT NULL
                         ORDER BY fn_bf, sn_swap_bf LIMIT {limit}""").df()
    if len(df) < 3:
        return None
    f, s = _filter_bits(df["fn_bf"]).astype(np.float32), _filter_bits(df["sn_swap_bf"]).astype(np.float32)
    observed = 2 * (f * s).sum(axis=1) / np.maximum(f.sum(axis=1) + s.sum(axis=1), 1)
    grams = [(_bigrams(a), _bigrams(b)) for a, b in zip(df["fn"], df["sn"])]
    clear = [2 * len(a & b) / (len(a) + len(b)) for a, b in grams]
    return float(np.corrcoef(observed, clear)[0, 1])


def map_guesses(con, name: str, mapping: dict) -> None:
    """Table ``name`` (k, v): an attack's guesses, token (or key) to value."""
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


def run(ws: Path, key_file: str, seed: int = 16, held: tuple[str, ...] = ("identifiers", "payload", "research")) -> dict:
    """The attacks as a party holding the zone subkeys (``zone:identifiers``, ``zone:payload`` and two
    projects' ``zone:research:<project>``) but not the master key: the residual risk of leaked zone keys
    (or of zones written before encryption). ``held`` narrows the subkeys: ``("identifiers",)`` is a
    linkage unit as PPRL designs it, given the encodings to link and nothing else (:data:`OPERATOR_LABEL`)."""
    from linkage.pseudonymise.store import research_key, research_project, zone_key

    rng = np.random.default_rng(seed)
    con = connect()
    master = load_master_key(key_file, workspace=ws)
    ids_key, pay_key = zone_key(master, "identifiers"), zone_key(master, "payload")
    res_key = (research_key(master, research_project(ws))
               if "research" in held and (ws / "research" / "metadata.json").exists() else None)
    del master                      # the attacks below hold the zone subkeys only
    t0 = time.perf_counter()
    cols = _load(con, ws, ids_key, pay_key, payload_held="payload" in held)
    context = "dobc_tok" in cols
    sex_in_zone = "sex_tok" in cols
    fore, sur = reference_lists()
    fore_prior, sur_prior = name_prior(fore), name_prior(sur)
    sex_payload = attack_sex_benefits(con, False, PERSON_KEY.format(a="i."))
    if sex_in_zone:
        sex = attack_sex(con)
        sex_context = attack_sex_context(con) if context else {}
        sex_benefits = attack_sex_benefits(con, context)
        sex_no_ctx = attack_sex_benefits(con, False) if context else {}
    else:   # sex sealed: the attacks below condition on the payload's sex per pseudo-person (SEX_STAND_IN)
        sex = sex_benefits = attack_sex_benefits(con, False)
        sex_context, sex_no_ctx = {}, {}
    initial = attack_initial(con, sex, fore)
    forename = attack_forename(con, sex, initial, fore)
    forename_bf = attack_forename(con, sex, initial, fore, column="fn_bf")
    forename_graph = attack_forename_graph(con, forename_bf, sex, initial, fore)
    forename_mined = attack_pattern_mining(con, forename_bf, fore_prior)
    surname = attack_surname(con, sur)
    sim_rng = np.random.default_rng([seed, 1])     # the Bloom attacks' random keys; rng stays the dob attack's
    weight_attacks = {c: attack_bloom_weight(con, c, fore_prior if c == "fn_bf" else sur_prior,
                                             bloom_params(ws, c), sim_rng)
                      for c in ("fn_bf", "sn_bf") if c in cols}
    weight_by_sex = (attack_bloom_weight(con, "fn_bf", fore_prior, bloom_params(ws, "fn_bf"), sim_rng,
                                         by_sex=sex_benefits, fore=fore) if "fn_bf" in cols else {})
    pair_fn, pair_sn = (attack_bloom_pair(con, fore_prior, sur_prior, bloom_params(ws, "sn_swap_bf"), sim_rng)
                        if "sn_swap_bf" in cols else ({}, {}))
    # the dob attack picks at random within what the structure leaves open: its expected success is
    # the mean over many draws (one draw is a lottery: from 0% to over 10% of full dates on the demo workspace)
    structure = dob_structure(con)
    dob_draws = [attack_dob(con, np.random.default_rng([seed, 2, d]), structure) for d in range(DOB_DRAWS)]
    py = research_pay(ws, res_key) if res_key is not None else None
    pairs = attack_pay_join(con, py)
    seconds_attack = time.perf_counter() - t0

    _score_table(con, ws, key_file)
    for name, mapping in (("g_sex", sex), ("g_ini", initial), ("g_fn", forename), ("g_fnbf", forename_bf),
                          ("g_fngraph", forename_graph), ("g_fnmined", forename_mined), ("g_sn", surname),
                          ("g_sexc", sex_context),
                          ("g_sexb", sex_benefits), ("g_sexp", sex_payload), ("g_sexn", sex_no_ctx),
                          ("g_wfn", weight_attacks.get("fn_bf", {})), ("g_wsn", weight_attacks.get("sn_bf", {})),
                          ("g_wfnsex", weight_by_sex), ("g_pfn", pair_fn), ("g_psn", pair_sn)):
        map_guesses(con, name, mapping)
    one = lambda sql: con.execute(sql).fetchall()[0]   # noqa: E731
    n_rows = one("SELECT count(*) FROM scored")[0]
    results = []

    def add(attack, field, hit, of, note="", blind=None):
        row = {"attack": attack, "field": field, "re_identified": hit, "of": of, "note": note}
        if blind is not None:       # a guess at a value: only what beats the blind guess re-identifies
            row.update(right=hit, blind=blind, re_identified=max(hit - blind, 0))
        row["share"] = row["re_identified"] / of if of else 0.0
        results.append(row)

    def add_field(attack, field, guess, key, truth, alt=None, note=""):
        right, blind, of = field_score(con, guess, key, truth, alt)
        add(attack, field, right, of, note, blind=blind)

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
    if not sex_in_zone:
        for attack in ("sex token: higher median pay is M",
                       "sex token: Child Benefit claimants are F, their partners M, couples by pay"):
            add(attack, "sex", 0, 0, "no sex token in the zone")
    if "sex_seal" in cols:
        hit, of = one("""SELECT count(*) FILTER (WHERE n >= 2), count(*) FROM (SELECT count(*) OVER (PARTITION BY
                             sex_seal) AS n FROM ids WHERE sex_seal IS NOT NULL)""")
        add("sex seal (sex_seal): records sharing a seal with another record", "sex", hit, of,
            f"{of - hit:,} of {of:,} seals distinct: randomised encryption, frequency gives nothing")
    if sex_in_zone:
        add_field("sex token: higher median pay is M", "sex", "g_sex", "s.sex_tok", "s.sex")
    if context and sex_in_zone:
        add_field("sex token: within each date-of-birth context (dobc_tok), higher median pay is M", "sex",
                  "g_sexc", "s.sex_tok", "s.sex", note="a context's only token: M when its median pay is above "
                  "the median over all tokens")
    if sex_in_zone:
        add_field("sex token: Child Benefit claimants are F, their partners M, couples by pay", "sex", "g_sexb",
                  "s.sex_tok", "s.sex", note="payload/benefits benefit_type and role" +
                  ("; the other sex token of a date-of-birth context, the other sex" if context else ""))
    if context and sex_in_zone:
        add_field("sex token: the same without the two-token context step", "sex", "g_sexn", "s.sex_tok", "s.sex",
                  note="one token per sex and context groups a person's records despite name typos, and the same-sex "
                       "persons of a context")
    add_field("sex without the sex token: the same from the payload, records grouped by name and date-of-birth "
              "tokens", "sex", "g_sexp", PERSON_KEY.format(a="s."), "s.sex",
              note="attribute inference from payload/ that no encoding of sex changes")
    add_field("forename initial token: frequency alignment by sex", "forename initial", "g_ini",
              "s.fn_initial_tok", "left(s.fn, 1)")
    add_field("forename token: frequency alignment by sex, initial, ethnicity", "forename", "g_fn", "s.fn_tok", "s.fn")
    add_field("whole Bloom-filter pattern frequency (fn_bf)", "forename", "g_fnbf", "s.fn_bf", "s.fn")
    add_field("graph matching: fn_bf Dice to 300 frequency anchors vs cleartext bigram Dice", "forename",
              "g_fngraph", "s.fn_bf", "s.fn", note="anchors by frequency, the rest by similarity")
    add_field("pattern mining: each bigram's bit positions fitted on 300 frequency anchors, every fn_bf named by "
              "its nearest predicted filter", "forename", "g_fnmined", "s.fn_bf", "s.fn",
              note="positions are shared across filters of one key" + ("; permuted per context" if context else ""))
    add_field("surname token: frequency alignment by name group", "surname", "g_sn", "s.sn_tok", "s.sn", "s.sn2")
    for c, g, field, truth, alt in (("fn_bf", "g_wfn", "forename", "s.fn", None),
                                    ("sn_bf", "g_wsn", "surname", "s.sn", "s.sn2")):
        if c in cols:
            add_field(f"Bloom-filter weight ({c}: bits set, unchanged by any permutation): most probable name",
                      field, g, f"s.{c}", truth, alt, "weights learnt from reference names under random keys")
    if "fn_bf" in cols:
        add_field("Bloom-filter weight (fn_bf), prior by the sex inferred from the benefits payload", "forename",
                  "g_wfnsex", "s.fn_bf", "s.fn", note="sex as the Child Benefit / couples attack guesses it")
    if "sn_swap_bf" in cols:
        pair = "s.fn_bf || '|' || s.sn_swap_bf"
        r = _pair_dice_correlation(con)
        note = (f"Dice of a record's two filters vs its names' bigram Dice: r = {r:.3f}" if r is not None else "")
        add_field("within one record: Dice(fn_bf, sn_swap_bf), same key and context, most probable names",
                  "forename", "g_pfn", pair, "s.fn", note=note)
        add_field("within one record: Dice(fn_bf, sn_swap_bf), same key and context, most probable names",
                  "surname", "g_psn", pair, "s.sn", "s.sn2", note=note)
    for c, what in {"fn_tok": "forename", "sn_tok": "surname", **NAME_DATE_TOKENS}.items():
        if c in cols:
            hit, of = one(f"""WITH k AS (SELECT {c} AS t, count(DISTINCT person_id) AS k FROM scored
                                         WHERE {c} IS NOT NULL GROUP BY 1)
                              SELECT count(*) FILTER (WHERE k.k >= 2), count(*) FROM scored s JOIN k ON k.t = s.{c}""")
            add(f"{c} ({what}): token frequency", "name", hit, of,
                "records whose token more than one person carries: the most any frequency attack can use")
    # full name + clear birth year + sex, and persons whose combination is unique (singled out)
    con.execute(f"""CREATE TABLE fullname AS SELECT s.person_id FROM scored s
                    JOIN g_fn f ON f.k = s.fn_tok JOIN g_sn n ON n.k = s.sn_tok JOIN g_sex x ON x.k = s.sex_tok
                    WHERE f.v = s.fn AND (n.v = s.sn OR n.v = s.sn2) AND x.v = s.sex""")
    hit = one("SELECT count(*) FROM fullname")[0]
    uniq = one(f"""WITH p AS (SELECT person_id, count(*) OVER (PARTITION BY upper(forename), upper(surname),
                                   birth_year, sex) AS k FROM {read_literal(ws / 'truth' / 'persons.parquet')})
                   SELECT count(DISTINCT f.person_id) FROM fullname f JOIN p USING (person_id) WHERE p.k = 1""")[0]
    persons = one(f"SELECT count(*) FROM {read_literal(ws / 'truth' / 'persons.parquet')}")[0]
    blind = one("""SELECT count(*) FROM scored s JOIN (SELECT fn, sn, sex FROM scored GROUP BY ALL
                                                      ORDER BY count(*) DESC LIMIT 1) t USING (fn, sn, sex)""")[0]
    add("full name + birth year (clear) + sex", "name, birth year, sex", hit, n_rows, blind=blind)
    add("full name + birth year + sex: persons singled out", "person", uniq, persons,
        "unique (forename, surname, birth year, sex) in the population")
    # rows by their (month token, day token) and true date; a draw's hits are a lookup of its guesses
    cells = con.execute("""SELECT dob_month_tok AS mt, dob_day_tok AS dt, month(dob) AS m, day(dob) AS d,
                                  count(*) FILTER (WHERE birth_year = year(dob)) AS n, count(*) AS rows
                           FROM scored WHERE dob_month_tok IS NOT NULL AND dob_day_tok IS NOT NULL
                           GROUP BY ALL""").df()
    draws = []
    for dob in dob_draws:
        right = (cells["mt"].map(dob["month"]) == cells["m"]) & (cells["dt"].map(dob["day"]) == cells["d"])
        draws.append(int(cells.loc[right, "n"].sum()))
    hit, of = round(float(np.mean(draws))), int(cells["rows"].sum())
    blind = one("""SELECT count(*) FROM scored s JOIN (SELECT month(dob) AS m, day(dob) AS d FROM scored
                     WHERE dob_month_tok IS NOT NULL GROUP BY ALL ORDER BY count(*) DESC LIMIT 1) t
                     ON month(s.dob) = t.m AND day(s.dob) = t.d WHERE s.dob_month_tok IS NOT NULL""")[0]
    if of:
        spread = [max(h - blind, 0) / of for h in draws]
        note = (f"mean of {len(draws)} seeded draws within what the tokens leave open "
                f"(one draw: {100 * min(spread):.2f}% to {100 * max(spread):.2f}%)")
    else:
        hit, blind, of = 0, 0, n_rows
        note = "no input: the zone holds no day or month token (dob_day_tok, dob_month_tok NULL in every row)"
    add("date of birth from day/month/swap tokens + birth year", "full date of birth", hit, of, blind=blind, note=note)
    # pay join: a research person re-identified when the record tokens found for them all
    # belong to one true person (truth, through the crosswalk)
    skipped = []
    if res_key is None:        # no research/ (assemble not run) or no research subkey: its attacks have no input
        skipped.append("the research/ attacks (pay joins, cross-project joins): "
                       + ("no research subkey held" if "research" not in held else "no research/ in this workspace"))
    else:
        research_persons = _research_persons(ws, key_file)
        con.register("joined", pairs)
        _research_truth(con, ws, key_file)
        hit = one("""SELECT count(*) FROM (SELECT j.person FROM joined j JOIN scored s USING (record_token)
                                           JOIN research_truth t ON t.person = j.person
                                           GROUP BY j.person HAVING bool_and(s.person_id = t.person_id))""")[0]
        add("research person-years joined to payload earnings on exact (year, pay)",
            "record token of a research person", hit, max(research_persons, 1),
            "research/person_year.parquet; a person counted when every token found is theirs")
        for label, band in (("pay rounded to the nearest 1,000", "round(pay, -3)"),
                            ("pay as its decile within the year", "ntile(10) OVER (PARTITION BY year ORDER BY pay)")):
            hit = one(_sequence_join_sql(band))[0]
            add(f"what if research pay were {label}: pay sequences joined to payload earnings",
                "research person", hit, max(research_persons, 1),
                "each person's (year, band) sequence equal to one pseudo-person's in the payload and to no other")
        _add_cross_project(con, ws, add, py, research_persons,
                           "the attacker holds both projects' research subkeys; ")
    linkage = _linkage(ws)
    return {"workspace_rows": n_rows, "persons": persons, "seed": seed, "skipped": skipped,
            "attack_seconds": round(seconds_attack, 1), "results": results, "linkage": linkage}


def _markdown(report: dict, label: str) -> str:
    lines = [f"## {label}", "",
             f"{report['workspace_rows']:,} identifier rows, {report['persons']:,} persons; attacks took "
             f"{report['attack_seconds']} s (seed {report['seed']})"
             + (f"; run {report['run']}" if report.get("run") else "") + ".", "",
             "| attack | field | right | blind guess | re-identified | of | share | goal | met |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        guessed = f"{r['right']:,} | {r['blind']:,}" if r.get("blind") is not None else "- | -"
        lines.append(f"| {r['attack']} | {r['field']} | {guessed} | {r['re_identified']:,} | {r['of']:,} | "
                     f"{100 * r['share']:.2f}% | < {100 * GOAL:.0f}% | {'yes' if r['share'] < GOAL else 'no'} |"
                     + (f" {r['note']}" if r["note"] else ""))
    if report.get("skipped"):
        lines += [""] + [f"Not run: {x}." for x in report["skipped"]]
    if report.get("linkage"):
        lines += ["", "Linkage accuracy of the same workspace (`reports/evaluation.json`):", "",
                  "| " + " | ".join(report["linkage"]) + " |", "|" + "---:|" * len(report["linkage"]),
                  "| " + " | ".join(f"{v:.4f}" for v in report["linkage"].values()) + " |"]
    return "\n".join(lines) + "\n"


DOB_DRAWS = 500     # draws of the date-of-birth attack's random picks; its figure is their mean
PUBLIC_KEY = "public data, same run"


def _public_same_run() -> dict:
    """hhlink and the cleartext Splink reference on FEBRL1-4 (:func:`bench.public.measure`), one timed run each.

    ``hhlink link-files`` builds its filters with the zone's keys, lengths, hash counts and
    XOR-folding, per value (no date-of-birth context) and not levelled
    (:func:`linkage.link_files.stage.in_memory_encodings`): it writes no zone, so nothing stored
    needs either.
    """
    from bench import public

    peer = str(public.PEERS / "bin" / "python") if (public.PEERS / "bin" / "python").exists() else None
    return public.measure(list(public.DATASETS), ["hhlink", "splink"] + (["anonlink"] if peer else []), peer,
                          repeat=1)


def _public_markdown(results: dict) -> str:
    from bench.public import table

    met = sum(t["met"] for t in results["targets"])
    # without the peak-memory column: a child of this (large) process inherits its high-water mark on
    # Linux, so every system would show this process's size; bench/results/public.md has it per system
    rows = [line.rsplit("|", 2)[0] + "|" for line in table(results).splitlines()]
    lines = ["## Linkage on public data in the same run (FEBRL1-4, `bench/public.py`)", "",
             f"Measured {results['when']}: `hhlink link-files` (the zone's keys, filter lengths, hash counts and "
             "XOR-folding; per value, not levelled: it stores no encoding), beside the "
             "cleartext Splink reference; one timed run each (`python -m bench.public` times three and "
             f"measures memory). Targets of issue 15: {met} of {len(results['targets'])} met.", "", *rows, "",
             "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in results["targets"]]
    return "\n".join(lines) + "\n"


KEYLESS_LABEL = "keyless view (this code: identifiers/, payload/ and research/ encrypted at rest, research pay rounded)"
OPERATOR_LABEL = ("linkage-operator view (the identifiers subkey only: the encodings a PPRL linkage unit is given "
                  "to link; no payload, no research extract)")
ZONE_KEYS_LABEL = ("zone-keys view (residual: the zone subkeys held - identifiers, payload and two projects' "
                   "research - not the master key)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--key-file", required=True, help="used only to score (crosswalk -> truth), never by an attack")
    ap.add_argument("--label", default=None, help="label of a single view's run (default: the view's own)")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="folder of privacy.md and privacy.json (default: bench/results)")
    ap.add_argument("--view", choices=("all", "keyless", "operator", "zone-keys"), default="all",
                    help="keyless: an attacker with no key; operator: one holding the identifiers subkey only "
                         "(a linkage unit); zone-keys: one holding every zone subkey (not the master key), the "
                         "documented residual risk; all (default): the three views of one workspace in one run, "
                         "replacing every earlier run but those labelled 'before'")
    ap.add_argument("--public", action=argparse.BooleanOptionalAction, default=None,
                    help="also link the public FEBRL1-4 files with hhlink and the cleartext Splink reference "
                         "(bench/public.py, one timed run each) and report them with the attacks "
                         "(default: with --view all)")
    args = ap.parse_args(argv)
    reports = {}
    if args.view in ("all", "zone-keys"):
        reports[args.label if args.view != "all" and args.label else ZONE_KEYS_LABEL] = \
            run(args.workspace, args.key_file, args.seed)
    if args.view in ("all", "operator"):
        reports[args.label if args.view != "all" and args.label else OPERATOR_LABEL] = \
            run(args.workspace, args.key_file, args.seed, held=("identifiers",))
    if args.view in ("all", "keyless"):
        reports[args.label if args.view != "all" and args.label else KEYLESS_LABEL] = \
            run_keyless(args.workspace, args.key_file)
    for label, report in reports.items():
        report["run"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(_markdown(report, label))
    public = None
    if args.public or (args.public is None and args.view == "all"):
        public = _public_same_run()
        print(_public_markdown(public))
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    out_json = results / "privacy.json"
    runs = json.loads(out_json.read_text()) if out_json.exists() else {}
    if args.view == "all":
        runs = {k: v for k, v in runs.items() if k.startswith("before")}
    runs.update(reports)
    if public is not None:
        runs[PUBLIC_KEY] = public
    write_results(results, runs)
    return 0


def write_results(results: Path, runs: dict) -> None:
    """``privacy.json`` (every run, by label) and ``privacy.md`` rendered from it."""
    (results / "privacy.json").write_text(json.dumps(runs, indent=2, default=str) + "\n")
    md = ["# Re-identification attacks on the zones after pseudonymisation (`python -m bench.privacy`)", "",
          "Goal: every attack below 1% of records in every zone a party without the key, or a linkage operator "
          "holding only the identifiers zone's subkey, can hold (issue 16). Scoring "
          "decrypts the crosswalk (and research/) with the key to find each row's true person in truth/; no "
          "attack uses the key.",
          "", "Views: `--view keyless` is an attacker holding every zone after pseudonymisation and no key "
          "(`pseudonymised/identifiers/`, `payload/` and `research/` are encrypted at rest); `--view operator` is a "
          "linkage unit as privacy-preserving record linkage designs it, given the identifiers zone's subkey "
          "(`zone:identifiers`: every token and filter) and nothing else; `--view zone-keys` is the documented "
          "residual risk, an attacker who also holds the payload subkey and two projects' research subkeys "
          "(`zone:payload`, `zone:research:<project>`) but not the master key, so reads every zone as it was "
          "before encryption. The default (`--view all`) runs the three views on one workspace in one run, and "
          "links the public FEBRL files in the same run (last section). Runs labelled 'before' are from earlier "
          "code (exact research pay, zones in clear).",
          "", "Guessed values (sex, initial, names, date of birth): 'right' counts the records whose guess is their "
          "true value, the attack's blind guess standing in for any record it makes no guess for; 'blind guess' "
          "counts the records that naming the field's most common true value for every record gets right (no "
          "attack: a coin flip for sex, the commonest forename); 're-identified' is right minus blind guess, what "
          "the attack learns beyond guessing, and the share and goal are taken on it. Attacks that are not a "
          "guess at a value (row order, pay joins, singling out) show '-' and count every hit.",
          ""]
    md += [_markdown(r, lbl) for lbl, r in runs.items() if lbl != PUBLIC_KEY]
    if PUBLIC_KEY in runs:
        md.append(_public_markdown(runs[PUBLIC_KEY]))
    (results / "privacy.md").write_text("\n".join(md))


if __name__ == "__main__":
    raise SystemExit(main())
