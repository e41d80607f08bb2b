"""The Splink model of ``hhlink link-files``: the project's model cut to the roles a map provides.

Comparisons are those of :func:`linkage.link.model.model_settings` (its plain model: the
encodings here are keyed per value and live in memory only) whose role some file
provides (forename, surname, date of birth, postcode, address, sex), plus an exact-token
comparison of the generic identifier (``id``); NINO, UPN and middle-initial comparisons
are dropped. A role counts as present in a file when at least one row has a value.
Blocking rules are the project's prediction rules, the generic identifier in place of
NINO and UPN, two rules that catch a day/month swap and one on names within a postcode
district (for rows without a date of birth), broader rules own extracts can afford (names
alone, each name with the postcode or within the locality, bands of the address filter), each
kept when some pair of files (or a file and itself) has every role it uses; where two files
share no such rule, the first fallback rule their common roles allow is added. The postcode
has a level of its own for two adjacent characters transposed (``pc_swap_toks``, built by
the stage), between the exact match and the sector.

Training adapts to how much data there is, because Splink's estimators need enough
record pairs to be meaningful:

* Every level starts from a fixed prior m and u (:data:`PRIORS`, values typical of
  UK administrative data and of the project's error model).
* ``probability_two_random_records_match`` is estimated from deterministic rules
  (recall 0.9); if no pair meets them it is ``1 / (records - 1)``: each record
  expected to have about one match.
* u is estimated by random sampling when there are at least :data:`U_MIN_PAIRS`
  possible pairs; levels the sample never saw keep their prior u. After EM, each sampled u
  is corrected for the matches a random sample holds (:func:`_correct_u`).
* m is estimated by EM (blocks on the identifier, then on date of birth) when u was
  sampled and the block holds at least :data:`EM_MIN_PAIRS` pairs; otherwise, or if EM
  fails, the prior m stays. Levels EM never saw keep their prior m; trained m are floored at
  a tenth of the prior (:func:`_floor_m`).
* Term-frequency adjustments on name tokens are kept only from :data:`TF_MIN_RECORDS`
  records: in smaller files every name's frequency is at least 1/records, which would
  understate how rare most names are.

What was done is recorded in the summary and the report (``training``).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import splink.comparison_level_library as cll

from linkage.encodings import dice_sql, dice_sql_counted
from linkage.link.model import (PLAIN_PREDICTION_BLOCKS, SWAP_RULE, address_comparison, band_rule, model_settings,
                                rule_columns, rule_creator, rule_label, rule_sql)

log = logging.getLogger(__name__)

U_MIN_PAIRS = 20_000          # about 200 records
# u sampling dominates the run time of small inputs (each sampled pair computes up to ten Dice
# coefficients); 200k pairs keep the u of own extracts accurate (rare levels are corrected or kept
# at their prior): on FEBRL1-4 F1 was the same as with 300k within a key's noise, and FEBRL1 ran
# in a fifth less time
U_MAX_PAIRS = 200_000
EM_MIN_PAIRS = 200
MAX_PRIOR = 0.5               # probability_two_random_records_match: a finite prior weight (0) at most
TF_MIN_RECORDS = 1_000
LEVEL_NOT_OBSERVED = "level not observed in training dataset"   # Splink's marker in saved models

ROLE_COLUMNS = {
    "first_name": ("fn_tok", "fn_initial_tok", "fn_phon_tok", "fn_bf"),
    "surname": ("sn_tok", "sn_phon_tok", "sn_bf", "sn_swap_bf"),
    "dob": ("dob_tok", "dob_year_tok", "dob_month_tok", "dob_day_tok", "dob_swap_tok"),
    "sex": ("sex_tok",),
    "postcode": ("postcode_tok", "pc_sector_tok", "pc_district_tok", "pc_swap_toks"),
    "address": ("addr_bf",),
    "street": ("street_bf",),
    "locality": ("locality_bf",),
    "id": ("id_tok", "id_bf"),
}
_ROLE_OF = {c: r for r, cols in ROLE_COLUMNS.items() for c in cols}
COMPARISON_ROLE = {"forename": "first_name", "surname": "surname", "dob": "dob", "postcode": "postcode",
                   "address": "address", "street": "street", "locality": "locality", "sex": "sex", "id": "id"}
# address parts, each by Dice on its own filter (no term frequencies): with them, the joined
# address filter serves blocking only, so the same evidence is not counted twice. A typo in
# the house number or a street costs the street line's Dice a few points; a locality with its
# region folded in is short, so one typo costs more
PART_DICE = {"street": (0.95, 0.8, 0.6), "locality": (0.9, 0.7)}

ID_TYPO_LABEL = "Dice >= 0.75 (a mistyped identifier)"
# one address line joins number, street, locality and region: a typo in one part costs its
# Dice a few points, so the line is compared at finer steps than in the project link (where
# addresses come from one register and are equal or different)
ADDRESS_DICE = (0.95, 0.85, 0.75, 0.65, 0.55)
ID_TYPO_DICE = 0.75

# a date of birth with its month or its year mistyped (any digit, not only one year apart):
# the day and one other part equal. Own extracts are typed by hand more often than the
# project's sources, so link-files compares dates one level finer (before "same year and month")
DOB_ONE_PART_LABEL = "same day and year or same day and month"
DOB_ONE_PART_SQL = ("dob_day_tok_l = dob_day_tok_r and (dob_year_tok_l = dob_year_tok_r "
                    "or dob_month_tok_l = dob_month_tok_r)")

# a postcode with two adjacent characters swapped (``pc_swap_toks``, built by the stage): a
# typing error the sector and district levels do not catch where the swap is before the end
PC_SWAP_LABEL = "two adjacent characters transposed"
PC_SWAP_SQL = "list_contains(pc_swap_toks_l, postcode_tok_r)"

# (m, u) per non-null level; m None where the project's model fixes m itself
PRIORS: dict[str, dict[str, tuple[float | None, float]]] = {
    "forename": {"Exact match on fn_tok": (0.865, 0.006), "forename and surname swapped": (0.01, 0.00002),
                 "Dice >= 0.85": (0.04, 0.001),
                 "phonetic match": (0.02, 0.004), "Dice >= 0.6": (0.03, 0.01),
                 "one name in the other's place": (0.005, 0.0002), "same initial": (0.02, 0.06),
                 "All other comparisons": (0.01, 0.919)},
    "surname": {"Exact match on sn_tok": (0.835, 0.003), "forename and surname swapped": (0.01, 0.00002),
                "Dice >= 0.85": (0.04, 0.001),
                "phonetic match": (0.02, 0.003), "Dice >= 0.6": (0.03, 0.01),
                "one name in the other's place": (0.005, 0.0002), "All other comparisons": (0.06, 0.983)},     # surnames change on partnership
    "dob": {"Exact match on dob_tok": (0.965, 0.00005), "day and month swapped": (0.01, 0.00005),
            "same day and month, year one apart": (0.01, 0.0001), DOB_ONE_PART_LABEL: (0.01, 0.002),
            "same year and month": (None, 0.001),
            "same year": (None, 0.017), "born 15 or more years apart": (0.00001, 0.6),
            "All other comparisons": (0.00099, 0.3798)},
    "postcode": {"Exact match on postcode_tok": (0.8, 0.0005), "a postcode in common": (0.01, 0.0001),
                 PC_SWAP_LABEL: (0.01, 0.0002),
                 "same sector": (0.03, 0.003), "same district": (0.03, 0.01),
                 "All other comparisons": (0.12, 0.9862)},    # people move
    "address": {"Dice >= 0.95": (0.6, 0.0005), "Dice >= 0.85": (0.1, 0.001), "Dice >= 0.75": (0.06, 0.002),
                "Dice >= 0.65": (0.04, 0.0025), "Dice >= 0.55": (0.03, 0.004),
                "All other comparisons": (0.17, 0.99)},     # people move
    "street": {"Dice >= 0.95": (0.75, 0.0005), "Dice >= 0.8": (0.08, 0.002), "Dice >= 0.6": (0.05, 0.01),
               "All other comparisons": (0.12, 0.9875)},     # people move
    "locality": {"Dice >= 0.9": (0.8, 0.01), "Dice >= 0.7": (0.07, 0.02), "All other comparisons": (0.13, 0.97)},
    "sex": {"Exact match on sex_tok": (0.98, 0.5), "All other comparisons": (0.02, 0.5)},
    "id": {"Exact match on id_tok": (0.97, 0.00001), ID_TYPO_LABEL: (0.02, 0.0001),
           "All other comparisons": (0.01, 0.9999)},
}

# Own extracts are small (thousands of rows), so broader rules than the project's are
# affordable: same birthday and first initial, also with day and month swapped (at 1M
# persons the first alone made 48.6M comparisons, so the project link blocks on the
# phonetic forename instead).
#
# No single field is needed by every rule, so one missing or mistyped field cannot hide a
# pair: the project's rules all need a date of birth (or NINO/UPN), and own extracts often
# lack a date or carry a different one, so the names alone (any date), each name with the
# postcode (a name mistyped as well), and the swapped names (any date) reach those pairs.
_BROAD_RULES = (("dob_tok", "fn_initial_tok"),
                "l.dob_swap_tok = r.dob_tok AND l.fn_initial_tok = r.fn_initial_tok",
                "l.dob_tok = r.dob_swap_tok AND l.fn_initial_tok = r.fn_initial_tok",
                SWAP_RULE,
                # one name swapped exactly, the other mistyped, at the same postcode
                "l.fn_bf = r.sn_swap_bf AND l.postcode_tok = r.postcode_tok",
                "l.sn_swap_bf = r.fn_bf AND l.postcode_tok = r.postcode_tok",
                ("fn_tok", "sn_tok"),
                ("sn_tok", "postcode_tok"),
                ("fn_tok", "postcode_tok"),
                # one name and the locality (town and region), for a postcode mistyped as well
                ("sn_tok", "locality_bf"),
                ("fn_tok", "locality_bf"),
                # one name and the postcode with two adjacent characters transposed (a sub-block of
                # the name: the list test runs only on pairs sharing it)
                "l.sn_tok = r.sn_tok AND list_contains(l.pc_swap_toks, r.postcode_tok)",
                "l.fn_tok = r.fn_tok AND list_contains(l.pc_swap_toks, r.postcode_tok)",
                # one name in the other's place, the other mistyped, born the same day
                "l.fn_bf = r.sn_swap_bf AND l.dob_tok = r.dob_tok",
                "l.sn_swap_bf = r.fn_bf AND l.dob_tok = r.dob_tok",
                # both names different or missing (replaced, swapped and mistyped): the same date of
                # birth or postcode and a similar address line, by two bands of its filter each (a
                # sub-block of the date or postcode block, so it grows as they do)
                band_rule(("dob_tok",), "addr_bf", 1), band_rule(("dob_tok",), "addr_bf", 9),
                band_rule(("postcode_tok",), "addr_bf", 17), band_rule(("postcode_tok",), "addr_bf", 25),
                # names, date and postcode all mistyped or missing: a nearly equal address line, by
                # long bands of its filter (24 bits of two unrelated lines, a third of bits set, agree
                # about once in a million; on FEBRL4 the eight bands added 3.7k of 25M possible pairs)
                *(band_rule((), "addr_bf", start, 24) for start in range(33, 33 + 8 * 24, 24)))
FALLBACK_BLOCKS = (("fn_tok", "sn_tok"), ("sn_tok", "postcode_tok"), ("fn_tok", "postcode_tok"), ("dob_tok",),
                   ("id_tok",), ("sn_tok",), ("postcode_tok",), ("fn_tok",), ("addr_bf",))
# deterministic rules for the prior probability of a match: the first group with a usable rule
DETERMINISTIC = ((("id_tok", "dob_tok"), ("fn_tok", "sn_tok", "dob_tok")),
                 (("id_tok", "sn_tok"), ("fn_tok", "sn_tok", "postcode_tok")))
# EM blocks in order of preference: each session trains the comparisons its block does not
# use, and blocks are added until every comparison has been free in a session that ran
TRAINING_BLOCKS = (("id_tok",), ("dob_tok",), ("fn_tok", "sn_tok"), ("postcode_tok",), ("sn_tok",))


@dataclass
class ModelRun:
    """What :func:`run_model` leaves behind: DuckDB table names, facts for the summary, charts."""

    pairs_table: str | None
    clusters_table: str | None
    facts: dict = field(default_factory=dict)
    charts: dict = field(default_factory=dict)


def _roles(rule) -> set[str]:
    """The roles a rule needs: those of its columns, or of the columns an SQL rule equates."""
    return {_ROLE_OF[c] for c in rule_columns(rule)}


def prediction_rules(file_roles: dict[str, set[str]], link_only: bool = False) -> tuple[list, list[str]]:
    """Blocking rules that some pair of files can use, plus fallbacks so every pair of files shares one.

    Args:
        file_roles: each file's table name and the roles it provides.
        link_only: only pairs of different files are compared (a file and itself is not a pair).

    Returns:
        The rules (column tuples or SQL strings) and the pairs of tables no rule can compare.
    """
    names = list(file_roles)
    commons = {(a, b): file_roles[a] & file_roles[b] for i, a in enumerate(names)
               for b in names[i + 1 if link_only else i:]}
    project = [("id_tok",), *(b for b in PLAIN_PREDICTION_BLOCKS if not {"nino_tok", "upn_tok"} & rule_columns(b)),
               *_BROAD_RULES]
    # a rule is kept when some pair of files (or a file and itself) has every role it uses
    rules = [r for r in project if any(_roles(r) <= common for common in commons.values())]
    uncovered = []
    for (a, b), common in commons.items():
        if any(_roles(r) <= common for r in rules):
            continue
        extra = next((r for r in FALLBACK_BLOCKS if _roles(r) <= common), None)
        if extra is None:
            uncovered.append(f"{a} ~ {b}")
        else:
            rules.append(extra)
    return rules, uncovered


def _id_comparison():
    """The identifier: exact token, then Dice on its bigram filter (one digit mistyped or two transposed)."""
    import splink.comparison_library as cl

    return cl.CustomComparison(
        output_column_name="id",
        comparison_levels=[cll.NullLevel("id_tok"), cll.ExactMatchLevel("id_tok"),
                           cll.CustomLevel(f"{dice_sql('id_bf_l', 'id_bf_r')} >= {ID_TYPO_DICE}",
                                           label_for_charts=ID_TYPO_LABEL),
                           cll.ElseLevel()],
        comparison_description="id: exact token, Bloom-filter Dice")


def _part_comparison(part: str):
    """An address part by Dice on its Bloom filter, one level per threshold of :data:`PART_DICE`."""
    import splink.comparison_library as cl

    dice = dice_sql(f"{part}_bf_l", f"{part}_bf_r")
    return cl.CustomComparison(
        output_column_name=part,
        comparison_levels=[cll.NullLevel(f"{part}_bf"),
                           *(cll.CustomLevel(f"{dice} >= {t}", label_for_charts=f"Dice >= {t}")
                             for t in PART_DICE[part]),
                           cll.ElseLevel()],
        comparison_description=f"{part}: Bloom-filter Dice")


def _rule_dict(rule) -> dict:
    from splink import block_on

    if isinstance(rule, str):
        return {"blocking_rule": rule, "sql_dialect": "duckdb"}
    return block_on(*rule).get_blocking_rule("duckdb").as_dict()


def base_settings(present: set[str], rules: list, link_type: str, term_frequencies: bool) -> dict:
    """The Splink settings dict: the project's comparisons for present roles, with the priors set."""
    settings = model_settings("duckdb", context=False).create_settings_dict("duckdb")
    comparisons = [address_comparison("duckdb", ADDRESS_DICE).get_comparison("duckdb").as_dict()
                   if c["output_column_name"] == "address" else c
                   for c in settings["comparisons"] if COMPARISON_ROLE.get(c["output_column_name"]) in present]
    for comp in comparisons:
        if comp["output_column_name"] == "dob":
            levels = comp["comparison_levels"]
            at = next(i for i, lv in enumerate(levels) if lv["label_for_charts"] == "same year and month")
            levels.insert(at, cll.CustomLevel(DOB_ONE_PART_SQL, label_for_charts=DOB_ONE_PART_LABEL)
                          .get_comparison_level("duckdb").as_dict())
        if comp["output_column_name"] == "postcode":
            levels = comp["comparison_levels"]
            at = next(i for i, lv in enumerate(levels) if lv["label_for_charts"] == "same sector")
            levels.insert(at, cll.CustomLevel(PC_SWAP_SQL, label_for_charts=PC_SWAP_LABEL)
                          .get_comparison_level("duckdb").as_dict())
    parts = [p for p in PART_DICE if p in present]
    if parts:
        comparisons = [c for c in comparisons if c["output_column_name"] != "address"]
        comparisons += [_part_comparison(p).get_comparison("duckdb").as_dict() for p in parts]
    if "id" in present:
        comparisons.append(_id_comparison().get_comparison("duckdb").as_dict())
    for comp in comparisons:
        priors = PRIORS[comp["output_column_name"]]
        for level in comp["comparison_levels"]:
            # every filter's bit count is stored beside it (stage._filters_as_bits)
            level["sql_condition"] = dice_sql_counted(level["sql_condition"])
            if not term_frequencies:
                for k in ("tf_adjustment_column", "tf_adjustment_weight", "tf_minimum_u_value"):
                    level.pop(k, None)
            if level.get("is_null_level"):
                continue
            m, u = priors[level["label_for_charts"]]   # a KeyError here: link_model changed, update PRIORS
            if not level.get("fix_m_probability"):
                level["m_probability"] = m
            level["u_probability"] = u
    settings.update(link_type=link_type, comparisons=comparisons,
                    blocking_rules_to_generate_predictions=[_rule_dict(r) for r in rules])
    return settings


def _fill_unobserved(settings: dict, which: str) -> list[str]:
    """Put the prior back on levels a training step never saw; return them as "comparison: level"."""
    names = []
    for comp in settings["comparisons"]:
        for level in comp["comparison_levels"]:
            if level.get(f"{which}_probability") == LEVEL_NOT_OBSERVED:
                level[f"{which}_probability"] = PRIORS[comp["output_column_name"]][level["label_for_charts"]][
                    0 if which == "m" else 1]
                names.append(f"{comp['output_column_name']}: {level['label_for_charts']}")
    return names


def _floor_m(settings: dict) -> list[str]:
    """Raise each trained m to at least a tenth of its prior, then rescale the comparison's trained m to sum to 1.

    EM on a few hundred pairs cannot tell "never" from "rare": a level no match in the
    block showed (sex recorded differently, say) gets an m near zero and would veto every
    pair at that level. Returns the levels raised, as "comparison: level".
    """
    raised = []
    for comp in settings["comparisons"]:
        priors = PRIORS[comp["output_column_name"]]
        levels = [lv for lv in comp["comparison_levels"]
                  if not lv.get("is_null_level") and isinstance(lv.get("m_probability"), float | int)]
        free = [lv for lv in levels if not lv.get("fix_m_probability")]
        for lv in free:
            floor = priors[lv["label_for_charts"]][0] / 10
            if lv["m_probability"] < floor:
                lv["m_probability"] = floor
                raised.append(f"{comp['output_column_name']}: {lv['label_for_charts']}")
        fixed = sum(lv["m_probability"] for lv in levels if lv.get("fix_m_probability"))
        total = sum(lv["m_probability"] for lv in free)
        for lv in free:
            lv["m_probability"] *= (1 - fixed) / total
    return raised


def _correct_u(settings: dict, lam: float) -> int:
    """Take out of each sampled u the share of random pairs that are matches; return how many levels changed.

    A random pair is a match with probability lam, so the sample sees a level with
    probability lam m + (1 - lam) u. In small files with many duplicates lam is not
    negligible beside the u of a discriminating level (an exact date of birth, an
    identifier), and the raw sampled u would understate its weight several-fold. Where
    the matches explain all the sample saw, the level keeps the smaller of its prior and
    sampled u.
    """
    changed = 0
    for comp in settings["comparisons"]:
        priors = PRIORS[comp["output_column_name"]]
        for level in comp["comparison_levels"]:
            m, u = level.get("m_probability"), level.get("u_probability")
            if level.get("is_null_level") or not isinstance(m, float | int) or not isinstance(u, float | int):
                continue
            corrected = (u - lam * m) / (1 - lam)
            level["u_probability"] = corrected if corrected > 0 else min(u, priors[level["label_for_charts"]][1])
            changed += level["u_probability"] != u
    return changed


def _sample(records: int) -> float:
    # exact counts up to 300k records; beyond, Splink's estimate from a 10% sample of each side
    return 1.0 if records <= 300_000 else 0.1


def _count(sdfs, rule, link_type: str, records: int) -> int:
    from splink.blocking_analysis import count_comparisons_from_blocking_rules

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # small samples warn that the count is rough
        r = count_comparisons_from_blocking_rules(sdfs, blocking_rules=[rule_creator(rule)], link_type=link_type,
                                                  record_sample_proportion=_sample(records))
    return int(r[0]["cumulative_comparison_count"])


def train(sdfs, settings: dict, records: int, present: set[str], config, link_type: str) -> tuple[dict, dict]:
    """Estimate what the data allow (see the module docstring); return the settings and what was done."""
    from splink import Linker

    lc = config.link
    facts: dict = {"records": records, "term_frequency_adjustments": records >= TF_MIN_RECORDS}
    total_pairs = records * (records - 1) // 2
    # settings are validated once, here; the Linkers rebuilt with trained parameters skip it (seconds each)
    linker = Linker(sdfs, settings, log_level=logging.ERROR)
    group = next((g for g in DETERMINISTIC if any(_roles(r) <= present for r in g)), ())
    rules = [r for r in group if _roles(r) <= present]
    # at most MAX_PRIOR: with two records 1/(records - 1) is 1, an infinite prior weight Splink
    # writes into its SQL as "inf"
    prior = min(1 / max(records - 1, 1), MAX_PRIOR)
    lam, how = prior, f"prior 1/(records - 1), at most {MAX_PRIOR}"
    if rules:
        try:
            linker.training.estimate_probability_two_random_records_match(
                [rule_creator(r) for r in rules], recall=0.9)
            estimated = linker.misc.save_model_to_json()["probability_two_random_records_match"]
            if 0 < estimated <= MAX_PRIOR:
                lam, how = estimated, f"deterministic rules ({'; '.join(map(rule_label, rules))}), recall 0.9"
        except Exception as exc:  # noqa: BLE001 - no pair meets the rules: keep the prior
            log.info("probability_two_random_records_match not estimated (%s)", exc.__class__.__name__)
    settings = dict(settings, probability_two_random_records_match=lam)
    facts["probability_two_random_records_match"] = {"value": lam, "how": how}
    u_sampled = total_pairs >= U_MIN_PAIRS
    if u_sampled:
        linker = Linker(sdfs, settings, log_level=logging.ERROR, validate_settings=False)
        u_pairs = min(lc.u_max_pairs, U_MAX_PAIRS)
        # one chunk: each chunk is a query of its own, and rare levels never reach a count that stops early
        linker.training.estimate_u_using_random_sampling(max_pairs=u_pairs, seed=lc.seed, num_chunks=1)
        settings = linker.misc.save_model_to_json()
        facts["u"] = {"how": "random sampling", "max_pairs": u_pairs,
                      "levels_left_at_prior": _fill_unobserved(settings, "u")}
    else:
        facts["u"] = {"how": f"fixed priors (fewer than {U_MIN_PAIRS:,} possible pairs)"}
    em = []
    to_train = {c["output_column_name"] for c in settings["comparisons"]}
    for block in (b for b in TRAINING_BLOCKS if _roles(b) <= present):
        frees = {c for c in to_train if COMPARISON_ROLE[c] not in _roles(block)}
        if not frees:
            continue
        entry = {"block": rule_label(block)}
        entry["pairs"] = pairs = _count(sdfs, block, link_type, records)
        if not u_sampled:
            entry["ran"], entry["why_not"] = False, "u not estimated: too few records"
        elif pairs < EM_MIN_PAIRS:
            entry["ran"], entry["why_not"] = False, f"fewer than {EM_MIN_PAIRS} pairs in the block"
        else:
            linker = Linker(sdfs, settings, log_level=logging.ERROR, validate_settings=False)
            try:
                linker.training.estimate_parameters_using_expectation_maximisation(
                    rule_creator(block), max_pairs=lc.em_max_pairs)
                settings = linker.misc.save_model_to_json()
                entry["ran"] = True
                entry["levels_left_at_prior"] = _fill_unobserved(settings, "m")
                entry["trained"] = sorted(frees)
                to_train -= frees
            except Exception as exc:  # noqa: BLE001 - EM that cannot run leaves the prior m
                entry["ran"], entry["why_not"] = False, f"EM failed ({exc.__class__.__name__}); prior m kept"
        em.append(entry)
    facts["m"] = {"how": "EM" if any(e["ran"] for e in em) else "fixed priors", "em": em,
                  "comparisons_at_prior_m": sorted(to_train)}
    if any(e["ran"] for e in em):
        facts["m"]["levels_raised_to_floor"] = _floor_m(settings)
    if u_sampled:
        facts["u"]["levels_corrected_for_matches_in_the_sample"] = _correct_u(settings, lam)
    return settings, facts


def run_model(con, inputs, config, threshold: float, out: Path, link_only: bool = False) -> ModelRun:
    """Train, score and cluster the ``ids_<name>`` tables; write ``out/model.json``.

    Args:
        con: the DuckDB connection holding ``ids_<name>`` per input.
        inputs: the inputs (``name``, ``rows``, ``spec.table``, ``present``: the roles with values).
        config: the hhlink config (``link.keep_pairs_above``, ``link.seed``, sample sizes).
        threshold: match probability at or above which records share a cluster.
        out: the folder being built.
        link_only: compare records of different files only.

    Returns:
        A :class:`ModelRun`.
    """
    from splink import DuckDBAPI, Linker

    used = [inp for inp in inputs if inp.rows]
    records = sum(inp.rows for inp in used)
    file_roles = {inp.spec.table: inp.present for inp in used}
    present = set().union(*file_roles.values()) if file_roles else set()
    link_only = link_only and len(used) > 1
    rules, uncovered = prediction_rules(file_roles, link_only)
    link_type = "link_only" if link_only else "link_and_dedupe" if len(used) > 1 else "dedupe_only"
    settings = base_settings(present, rules, link_type, records >= TF_MIN_RECORDS)
    facts: dict = {"comparisons": [c["output_column_name"] for c in settings["comparisons"]],
                   "blocking_rules": [rule_label(r) for r in rules], "files_not_compared": uncovered}
    if records < 2 or not rules:
        # (with no blocking rule Splink would compare every pair: the files share nothing to compare on)
        (out / "model.json").write_text(json.dumps(settings, indent=2))
        facts["training"] = {"records": records, "note": "fewer than two records: nothing to compare" if records < 2
                             else "no blocking rule fits the roles the files have: nothing compared"}
        return ModelRun(None, None, facts)
    db_api = DuckDBAPI(connection=con)
    sdfs = [db_api.register(f"ids_{inp.name}", dataset_display_name=inp.name) for inp in used]
    settings, facts["training"] = train(sdfs, settings, records, present, config, link_type)
    linker = Linker(sdfs, settings, log_level=logging.ERROR, validate_settings=False)
    model = linker.misc.save_model_to_json()
    model.pop("linker_uid", None)      # a random name per Linker object: drop it so runs reproduce byte for byte
    (out / "model.json").write_text(json.dumps(model, indent=2))
    charts = {"match_weights": linker.visualisations.match_weights_chart().chart_dict,
              "m_u_parameters": linker.visualisations.m_u_parameters_chart().chart_dict}
    facts["blocking"], facts["records_not_compared"] = blocking_coverage(
        con, [f"ids_{inp.name}" for inp in used], rules, link_type)
    # pairs below the cluster threshold are kept down to keep_pairs_above, for review and the report
    pairs = linker.inference.predict(threshold_match_probability=min(config.link.keep_pairs_above, threshold))
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(
        pairs, threshold_match_probability=threshold)
    return ModelRun(pairs.physical_name, clusters.physical_name, facts, charts)


def blocking_coverage(con, tables: list[str], rules: list, link_type: str, labels: list[str] | None = None,
                      keep: str | None = None) -> tuple[list[dict], dict]:
    """Comparisons each prediction rule adds, and the records no rule compares, counted exactly.

    One query pairs the records under every rule the way Splink's prediction does (within a
    table ``l.unique_id < r.unique_id``; across tables, left table first), keeps each pair once
    under the first rule that reaches it, and counts: a rule's marginal comparisons are the
    pairs it reaches first, so the counts add up to the comparisons scored. Plain SQL on the
    ``ids_*`` tables: exact at any size, and without Splink's per-call setup (a second or
    more, which on a small file was a sixth of the run).

    Args:
        con: the DuckDB connection holding ``tables`` (``unique_id`` and the encodings).
        tables: one table per file.
        rules: the prediction blocking rules, in Splink's order.
        link_type: ``dedupe_only``, ``link_only`` or ``link_and_dedupe`` (which table pairs count).
        labels: how the counts name each rule (default :func:`rule_label`).
        keep: if given, a temporary table of this name is left with one ``unique_id`` per
            record that some rule compares (for counts by record weight).

    Returns:
        ``([{"rule", "marginal_comparisons", "cumulative_comparisons", "is_estimate"}, ...],
        {"records": n, "share": n / all records})``: n records no rule pairs with any other.
    """
    pairs = [(a, b) for i, a in enumerate(tables) for b in tables[i:]
             if (a != b or link_type != "link_only") and (a == b or link_type != "dedupe_only")]
    total = sum(con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in tables)
    reached = " UNION ALL ".join(
        f"SELECT l.unique_id AS a, r.unique_id AS b, {k} AS k FROM {a} l JOIN {b} r ON ({rule_sql(rule)})"
        + (" AND l.unique_id < r.unique_id" if a == b else "") for a, b in pairs for k, rule in enumerate(rules))
    first: dict[int, int] = {}
    alone = total
    if reached:
        con.execute(f"CREATE OR REPLACE TEMP TABLE __hh_blocked AS SELECT a, b, min(k) AS k FROM ({reached}) "
                    "GROUP BY a, b")
        first = dict(con.execute("SELECT k, count(*) FROM __hh_blocked GROUP BY k").fetchall())
        con.execute("CREATE OR REPLACE TEMP TABLE __hh_reached AS SELECT a AS unique_id FROM __hh_blocked "
                    "UNION SELECT b FROM __hh_blocked")
        alone -= con.execute("SELECT count(*) FROM __hh_reached").fetchall()[0][0]
        con.execute("DROP TABLE __hh_blocked")
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE __hh_reached (unique_id VARCHAR)")
    if keep:
        con.execute(f"DROP TABLE IF EXISTS {keep}; ALTER TABLE __hh_reached RENAME TO {keep}")
    else:
        con.execute("DROP TABLE __hh_reached")
    counts, cumulative = [], 0
    for k, rule in enumerate(rules):
        cumulative += first.get(k, 0)
        counts.append({"rule": labels[k] if labels else rule_label(rule), "marginal_comparisons": first.get(k, 0),
                       "cumulative_comparisons": cumulative, "is_estimate": False})
    return counts, {"records": alone, "share": round(alone / total, 6) if total else 0.0}


