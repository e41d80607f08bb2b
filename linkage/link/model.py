"""The Splink model on keyed encodings: comparisons, blocking rules and training rules.

Everything here builds Splink settings from the identifiers contract
(``pseudonymised/identifiers/``): HMAC tokens compared for equality, Bloom-filter
encodings compared by Dice similarity in SQL. No cleartext is needed or seen.

The zone's name encodings (and initials) are keyed with each record's date-of-birth
*context* (``dobc_tok``: the date with day and month in sorted order), so that a token's
frequency is that of one person, never of a name (issue 16). Two records' names are then
comparable only when they share the context: the name and middle-initial comparisons
are null between records whose dates differ, and ``names_partial_date`` carries the name
evidence between them (the full name with two of the three date parts, ``name_ym_tok``,
``name_yd_tok``, ``name_md_tok``). Sex (``sex_tok``) is keyed with the date context and the
postcode together: it is compared only between records of one date at one address, the two
people of a household who share a birthday (``sex_seal``, for assemble, is no comparison).
``hhlink link-files`` encodes per value, in memory only, and uses the plain model
(``context=False``, :data:`PLAIN_PREDICTION_BLOCKS`).
"""

from __future__ import annotations

import math
import re

import splink.comparison_level_library as cll
import splink.comparison_library as cl
from splink import SettingsCreator, block_on

from linkage.encodings import dice_sql

# The encodings that define one identity: rows of a source equal on all of these are the
# same identity seen again (a pupil's next school year, a worker's next tax year, at a new
# address or the old one). Addresses change over a life, so they do not split identities:
# each identity keeps its most frequent address and the list of all its postcodes.
IDENTITY_COLUMNS = (
    "nino_tok", "upn_tok", "dob_tok", "dob_year_tok", "dob_month_tok", "dob_day_tok", "dob_swap_tok",
    "fn_tok", "sn_tok", "fn_initial_tok", "fn_phon_tok", "sn_phon_tok", "mn_initial_tok",
    "dobc_tok", "name_ym_tok", "name_yd_tok", "name_md_tok",
    "fn_bf", "sn_bf", "sn_swap_bf",
)
# two records' context-keyed encodings are comparable (the same date of birth, day and month
# in either order, or both without one)
SAME_CONTEXT = "dobc_tok_l IS NOT DISTINCT FROM dobc_tok_r"
# (sex_tok is keyed with the postcode, so it travels with the identity's address: it must not
# split identities either)
ADDRESS_COLUMNS = ("postcode_tok", "pc_sector_tok", "pc_district_tok", "addr_bf", "sex_tok")

# forename and surname swapped: each record's forename filter is the other's surname filter
# under the forename key (``sn_swap_bf``), so a swapped pair is equal on both
SWAP_RULE = "l.fn_bf = r.sn_swap_bf AND l.sn_swap_bf = r.fn_bf"
SWAP_DICE = 0.7
# floors for trained m and u (see floor_levels): a level no match showed weighs no less than
# MIN_WEIGHT (strong evidence against, one in 4,096, but not the -20 to -26 of a veto), and
# a level no random pair showed keeps u >= MIN_U
MIN_WEIGHT = -12
MIN_U = 1e-6

# Blocking rules for prediction: any one of them brings a pair into comparison. A rule is
# the columns that must be equal, or SQL over l. and r. where it equates different columns.
# Every rule names the date of birth down to the day, or a name and a year-level date (a rule
# such as "dob and forename initial" made 48.6M of 66.5M comparisons at 1M persons). The link
# stage runs them anchored (linkage/link/blocking.py): after rules on NINO, UPN and full name
# with date of birth, each of these compares a few identities per anchor group, so chance
# meetings of two people cost a few comparisons rather than the product of their identities.
PLAIN_PREDICTION_BLOCKS: tuple[tuple[str, ...] | str, ...] = (
    ("nino_tok",),
    ("upn_tok",),
    ("dob_tok", "fn_phon_tok"),
    ("dob_tok", "sn_phon_tok"),
    ("fn_tok", "sn_tok", "dob_year_tok", "dob_month_tok"),  # day of birth mistyped
    ("fn_tok", "sn_tok", "dob_year_tok", "dob_day_tok"),    # month of birth mistyped
    ("fn_tok", "sn_tok", "dob_month_tok", "dob_day_tok"),   # year of birth mistyped
    ("postcode_tok", "fn_phon_tok", "dob_year_tok"),
    # day and month of birth swapped (the token of the swapped date, when the day is <= 12)
    "l.dob_swap_tok = r.dob_tok AND l.fn_phon_tok = r.fn_phon_tok",
    "l.dob_tok = r.dob_swap_tok AND l.fn_phon_tok = r.fn_phon_tok",
    # forename and surname swapped (one record's forename filter equals the other's surname
    # filter under the same key, both ways), born the same year
    SWAP_RULE + " AND l.dob_year_tok = r.dob_year_tok",
    # both names mistyped or swapped: born the same day at the same postcode (few pairs: twins)
    ("dob_tok", "postcode_tok"),
    # (Not names with postcode: that compares parents and children who share a name and a
    # home, where the postcode and surname agree because they are a family.)
)
# The same rules on the zone's context-keyed encodings (above): a name token equal between two
# records implies the same date context, so "dob and phonetic forename" covers the swapped
# day and month too; the full name with two date parts is one token per pair of parts; the
# swapped names compare within one context; the phonetic forename at a postcode in a birth
# year (a name token is now bound to the full date) becomes the postcode and the birth year.
PREDICTION_BLOCKS: tuple[tuple[str, ...] | str, ...] = (
    ("nino_tok",),
    ("upn_tok",),
    ("dobc_tok", "fn_phon_tok"),
    ("dobc_tok", "sn_phon_tok"),
    ("name_ym_tok",),   # day of birth mistyped
    ("name_yd_tok",),   # month of birth mistyped
    ("name_md_tok",),   # year of birth mistyped
    ("postcode_tok", "dob_year_tok"),
    SWAP_RULE + " AND l.dobc_tok = r.dobc_tok",
    ("dob_tok", "postcode_tok"),
)
# EM training: each rule leaves the comparisons it does not use free to be estimated.
# (Not postcode: pairs sharing an address are mostly relatives, and EM then learns
# "family" rather than "same person".)
# Nor names alone: same-name pairs include parents and children named alike, and EM then
# learns that a date-of-birth mismatch is common among matches.
TRAINING_BLOCKS = (
    ("nino_tok",),
    ("dob_tok",),
)
# Comparisons of context-keyed encodings: not null only between records of one date context.
# A random sample of record pairs holds few such pairs, and most of them are the same person
# (few people share a date of birth), so their sampled u would say "names agree a third of the
# time among non-matches". Their u is measured by the pseudonymiser instead, on a sample of
# names in one shared context (linkage/pseudonymise/context_u.py).
CONTEXT_COMPARISONS = ("forename", "surname", "middle_initial", "sex")


def rule_columns(rule: tuple[str, ...] | str) -> set[str]:
    """The columns a blocking rule equates (of either side, for an SQL rule)."""
    if isinstance(rule, str):
        return set(re.findall(r"\b[lr]\.(\w+)", rule))
    return set(rule)


def filter_band(column: str, side: str, start: int, length: int = 8) -> str:
    """SQL for ``length`` bits of a Bloom-filter column from bit ``start`` (1-based), as a '0'/'1' string.

    Bits of a keyed filter are set at HMAC-chosen positions, so any run of them is a random
    sample: records whose filters are alike (Dice 0.9) agree on a band of 8 bits far more
    often than two random records (about 1 in 2^8 at half fill). Equality on a band is a
    locality-sensitive blocking key computed at link time; nothing new is stored.
    """
    return f"substring(({side}.{column})::BITSTRING::VARCHAR, {start}, {length})"


def band_rule(exact: tuple[str, ...], column: str, start: int, length: int = 8) -> str:
    """A blocking rule: ``exact`` columns equal and one band of ``column``'s filter equal."""
    return " AND ".join([*(f"l.{c} = r.{c}" for c in exact),
                         f"{filter_band(column, 'l', start, length)} = {filter_band(column, 'r', start, length)}"])


def rule_label(rule: tuple[str, ...] | str) -> str:
    """How reports name a blocking rule."""
    return rule if isinstance(rule, str) else " and ".join(rule)


def rule_sql(rule: tuple[str, ...] | str) -> str:
    """The rule as SQL over ``l.`` and ``r.``."""
    return rule if isinstance(rule, str) else " AND ".join(f"l.{c} = r.{c}" for c in rule)


def rule_creator(rule: tuple[str, ...] | str):
    """The rule as Splink takes it: ``block_on`` for columns, the SQL string as it is."""
    return rule if isinstance(rule, str) else block_on(*rule)


def swapped_names_sql(dialect: str, half: bool = False) -> str:
    """SQL true when the records' forename and surname are swapped (Dice >= SWAP_DICE both ways).

    With ``half``: one record's forename is the other's surname, or the reverse (Dice >= 0.9),
    whatever the other name is (swapped, then one name replaced or dropped).
    """
    a, b = dice_sql("fn_bf_l", "sn_swap_bf_r", dialect), dice_sql("sn_swap_bf_l", "fn_bf_r", dialect)
    return f"({a} >= 0.9 OR {b} >= 0.9)" if half else f"{a} >= {SWAP_DICE} AND {b} >= {SWAP_DICE}"


def _context_null(column: str, context: bool, place: bool = False) -> cll.CustomLevel | cll.NullLevel:
    """The null level of a context-keyed column: missing on either side, or the contexts differ.

    ``place``: the token is keyed with the postcode too (``sex_tok``), so another postcode is
    another context.
    """
    if not context:
        return cll.NullLevel(column)
    other = f"NOT ({SAME_CONTEXT})" + (" OR postcode_tok_l IS DISTINCT FROM postcode_tok_r" if place else "")
    label = "null, another date of birth or another postcode" if place else "null or another date of birth"
    return cll.CustomLevel(f"{column}_l IS NULL OR {column}_r IS NULL OR {other}",
                           label_for_charts=label).configure(is_null_level=True)


def _name_comparison(name: str, prefix: str, dialect: str, initial: bool, context: bool = True) -> cl.CustomComparison:
    dice = dice_sql(f"{prefix}_bf_l", f"{prefix}_bf_r", dialect)
    levels = [
        _context_null(f"{prefix}_tok", context),
        # a context-keyed token's frequency is one person's, not the name's: no term frequencies
        cll.ExactMatchLevel(f"{prefix}_tok", term_frequency_adjustments=not context),
        # before the partial levels: a swapped pair's names can also be partially alike
        cll.CustomLevel(swapped_names_sql(dialect), label_for_charts="forename and surname swapped"),
        cll.CustomLevel(f"{dice} >= 0.85", label_for_charts="Dice >= 0.85"),
        cll.CustomLevel(f"{prefix}_phon_tok_l = {prefix}_phon_tok_r", label_for_charts="phonetic match"),
        cll.CustomLevel(f"{dice} >= 0.6", label_for_charts="Dice >= 0.6"),
        cll.CustomLevel(swapped_names_sql(dialect, half=True), label_for_charts="one name in the other's place"),
    ]
    if initial:
        levels.append(cll.CustomLevel(f"{prefix}_initial_tok_l = {prefix}_initial_tok_r", label_for_charts="same initial"))
    return cl.CustomComparison(
        output_column_name=name, comparison_levels=[*levels, cll.ElseLevel()],
        comparison_description=f"{name}: exact token, Bloom-filter Dice, phonetic code" + (", initial" if initial else "")
        + (" (same date-of-birth context)" if context else ""),
    )


def _partial_date_names_comparison() -> cl.CustomComparison:
    """The full name between records whose dates of birth differ: equal with two of the three parts."""
    return cl.CustomComparison(
        output_column_name="names_partial_date",
        comparison_levels=[
            cll.CustomLevel(f"name_ym_tok_l IS NULL OR name_ym_tok_r IS NULL OR {SAME_CONTEXT}",
                            label_for_charts="null or the same date of birth").configure(is_null_level=True),
            cll.CustomLevel("name_ym_tok_l = name_ym_tok_r OR name_yd_tok_l = name_yd_tok_r "
                            "OR (name_md_tok_l = name_md_tok_r AND abs(birth_year_l - birth_year_r) < 15)",
                            label_for_charts="full name and two date parts"),
            # a parent and a child named alike who share a birthday: not a mistyped year (the
            # middle initial that told them apart is keyed with each one's own date)
            cll.CustomLevel("name_md_tok_l = name_md_tok_r",
                            label_for_charts="full name and birthday, born 15 or more years apart"),
            cll.ElseLevel(),
        ],
        comparison_description="full name with two of year, month and day of birth (dates differ)",
    )


def _context_exact(column: str, name: str, place: bool = False) -> cl.CustomComparison:
    """An exact-match comparison on a context-keyed token (null when the contexts differ; see :func:`_context_null`)."""
    return cl.CustomComparison(
        output_column_name=name,
        comparison_levels=[_context_null(column, True, place), cll.ExactMatchLevel(column), cll.ElseLevel()],
        comparison_description=f"{name}: exact token (same date-of-birth context{' and postcode' if place else ''})",
    )


def _dob_comparison(context: bool = True) -> cl.CustomComparison:
    """Date of birth. On the zone's encodings (``context``) there are no day or month tokens
    (a twelve- or thirty-one-valued token, with the calendar's structure, names its values: 2.50%
    of full dates for a holder of the identifiers subkey, ``bench/privacy.py``): a swap is the same
    date context (``dobc_tok``) with another date, a mistyped year shows through the names' token
    of month and day (``name_md_tok``, between records of one name), and a mistyped day or month
    is "same year", whose m is trained."""
    if context:
        return cl.CustomComparison(
            output_column_name="dob",
            comparison_levels=[
                cll.NullLevel("dob_tok"),
                cll.ExactMatchLevel("dob_tok"),
                cll.CustomLevel("dobc_tok_l = dobc_tok_r", label_for_charts="day and month swapped"),
                # a mistyped year: the day and month equal through the names' token of them
                # (a name with its month and day; different names cannot show it)
                cll.CustomLevel("name_md_tok_l = name_md_tok_r and abs(birth_year_l - birth_year_r) = 1",
                                label_for_charts="same day and month, year one apart"),
                # a mistyped day or month (no token tells which): trained, as EM sees them among
                # pairs of one NINO
                cll.CustomLevel("dob_year_tok_l = dob_year_tok_r", label_for_charts="same year"),
                cll.CustomLevel("abs(birth_year_l - birth_year_r) >= 15",
                                label_for_charts="born 15 or more years apart"),
                cll.ElseLevel(),
            ],
            comparison_description="date of birth: exact, swapped day/month (same date context), same year",
        )
    return cl.CustomComparison(
        output_column_name="dob",
        comparison_levels=[
            cll.NullLevel("dob_tok"),
            cll.ExactMatchLevel("dob_tok"),
            cll.CustomLevel("dob_swap_tok_l = dob_tok_r or dob_tok_l = dob_swap_tok_r",
                            label_for_charts="day and month swapped"),
            cll.CustomLevel("dob_month_tok_l = dob_month_tok_r and dob_day_tok_l = dob_day_tok_r "
                            "and abs(birth_year_l - birth_year_r) = 1",
                            label_for_charts="same day and month, year one apart"),
            # Partial agreements that no error in the data makes among true matches, so EM never
            # sees them: their m is fixed at a small prior instead of left untrained.
            cll.CustomLevel("dob_year_tok_l = dob_year_tok_r and dob_month_tok_l = dob_month_tok_r",
                            label_for_charts="same year and month").configure(m_probability=0.002,
                                                                               fix_m_probability=True),
            cll.CustomLevel("dob_year_tok_l = dob_year_tok_r", label_for_charts="same year").configure(
                m_probability=0.002, fix_m_probability=True),
            # a generation apart: namesakes in one family (a father and a son) rather than a mistyped date
            cll.CustomLevel("abs(birth_year_l - birth_year_r) >= 15", label_for_charts="born 15 or more years apart"),
            cll.ElseLevel(),
        ],
        comparison_description="date of birth: exact, swapped day/month, partial",
    )


def _postcode_comparison(dialect: str) -> cl.CustomComparison:
    overlap = ("arrays_overlap(postcode_toks_l, postcode_toks_r)" if dialect == "spark"
               else "list_has_any(postcode_toks_l, postcode_toks_r)")
    return cl.CustomComparison(
        output_column_name="postcode",
        comparison_levels=[
            cll.NullLevel("postcode_tok"),
            cll.ExactMatchLevel("postcode_tok"),
            cll.CustomLevel(overlap, label_for_charts="a postcode in common"),
            cll.CustomLevel("pc_sector_tok_l = pc_sector_tok_r", label_for_charts="same sector"),
            cll.CustomLevel("pc_district_tok_l = pc_district_tok_r", label_for_charts="same district"),
            cll.ElseLevel(),
        ],
        comparison_description="postcode unit (most frequent, then any in common), sector, district",
    )


def address_comparison(dialect: str, thresholds: tuple[float, ...] = (0.9, 0.7)) -> cl.CustomComparison:
    """The address line by Bloom-filter Dice, one level per threshold (highest first)."""
    dice = dice_sql("addr_bf_l", "addr_bf_r", dialect)
    return cl.CustomComparison(
        output_column_name="address",
        comparison_levels=[
            cll.NullLevel("addr_bf"),
            *(cll.CustomLevel(f"{dice} >= {t}", label_for_charts=f"Dice >= {t}") for t in thresholds),
            cll.ElseLevel(),
        ],
        comparison_description="address line: Bloom-filter Dice",
    )


def exact_level(column: str, name: str) -> cl.CustomComparison:
    """A comparison with one exact-match level on ``column`` (else: all other)."""
    return cl.CustomComparison(
        output_column_name=name,
        comparison_levels=[cll.NullLevel(column), cll.ExactMatchLevel(column), cll.ElseLevel()],
        comparison_description=f"{name}: exact token",
    )


def floor_levels(settings: dict, min_weight: float = MIN_WEIGHT, min_u: float = MIN_U) -> list[str]:
    """Raise untrained or tiny m and u to a floor, in place; return the levels raised, as "comparison: level".

    u is raised to ``min_u``; then m so that "All other comparisons" weighs at least ``min_weight``
    and every other level at least as much as "All other" (partial agreement is never worse
    evidence than none: EM on few such pairs can make it so).

    Splink scores a level that training never observed with m (or u) = 1e-6: a level that no
    true match showed in training (sex recorded differently, say) would veto every pair at
    it, and one the random sample never met would link on it alone. A floored comparison's
    free m are rescaled to sum to one with its fixed m.
    """
    raised = []
    for comp in settings["comparisons"]:
        levels = [lv for lv in comp["comparison_levels"] if not lv.get("is_null_level")]
        other = next((lv for lv in levels if lv.get("sql_condition") == "ELSE"), None)
        other_weight = min_weight
        for which in ("u", "m"):
            free = [lv for lv in levels if not lv.get(f"fix_{which}_probability")]

            def floor(lv, which=which):
                if which == "u":
                    return min_u
                # "All other" weighs at least min_weight; any other level at least as much as "All
                # other" (a partial agreement is never worse evidence than none)
                return lv["u_probability"] * 2 ** (min_weight if lv is other else max(min_weight, other_weight))
            low = [lv for lv in free if not isinstance(lv.get(f"{which}_probability"), float | int)
                   or lv[f"{which}_probability"] < floor(lv)]
            for lv in low:
                lv[f"{which}_probability"] = floor(lv)
                raised.append(f"{comp['output_column_name']}: {lv['label_for_charts']} ({which})")
            if low:
                fixed = sum(lv[f"{which}_probability"] for lv in levels if lv.get(f"fix_{which}_probability"))
                total = sum(lv[f"{which}_probability"] for lv in free)
                for lv in free:
                    lv[f"{which}_probability"] *= (1 - fixed) / total
            if which == "u" and other is not None and isinstance(other.get("m_probability"), float | int):
                other_weight = math.log2(max(other["m_probability"], 1e-300) / other["u_probability"])
    return raised


def model_settings(dialect: str = "duckdb", probability_two_random_records_match: float = 1e-6,
                   context: bool = True) -> SettingsCreator:
    """Splink settings for linking and deduplicating the three sources on encodings.

    Args:
        dialect: ``duckdb`` or ``spark`` (the Dice SQL differs).
        probability_two_random_records_match: the prior, refined by training.
        context: the encodings are keyed with the date-of-birth context (the identifiers zone);
            ``False`` for encodings keyed per value only (``hhlink link-files``, in memory).

    Returns:
        A :class:`splink.SettingsCreator`.
    """
    return SettingsCreator(
        link_type="link_and_dedupe",
        unique_id_column_name="unique_id",
        comparisons=[
            _name_comparison("forename", "fn", dialect, initial=True, context=context),
            _name_comparison("surname", "sn", dialect, initial=False, context=context),
            *([_partial_date_names_comparison()] if context else []),
            _dob_comparison(context),
            _postcode_comparison(dialect),
            address_comparison(dialect),
            exact_level("nino_tok", "nino"),
            exact_level("upn_tok", "upn"),
            _context_exact("sex_tok", "sex", place=True) if context else exact_level("sex_tok", "sex"),
            (_context_exact("mn_initial_tok", "middle_initial") if context
             else exact_level("mn_initial_tok", "middle_initial")),
        ],
        blocking_rules_to_generate_predictions=[
            rule_creator(r) for r in (PREDICTION_BLOCKS if context else PLAIN_PREDICTION_BLOCKS)],
        probability_two_random_records_match=probability_two_random_records_match,
        retain_matching_columns=False,
        retain_intermediate_calculation_columns=False,
        additional_columns_to_retain=["birth_year"],
    )
