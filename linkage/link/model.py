"""The Splink model on keyed encodings: comparisons, blocking rules and training rules.

Everything here builds Splink settings from the identifiers contract
(``pseudonymised/identifiers/``): HMAC tokens compared for equality, Bloom-filter
encodings compared by Dice similarity in SQL. No cleartext is needed or seen.
"""

from __future__ import annotations

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
    "sex_tok", "fn_tok", "sn_tok", "fn_initial_tok", "fn_phon_tok", "sn_phon_tok", "mn_initial_tok",
    "fn_bf", "sn_bf",
)
ADDRESS_COLUMNS = ("postcode_tok", "pc_sector_tok", "pc_district_tok", "addr_bf")

# Blocking rules for prediction: any one of them brings a pair into comparison. A rule is
# the columns that must be equal, or SQL over l. and r. where it equates different columns.
# Every rule names the date of birth down to the day, or a name and a year-level date, so
# comparisons grow about linearly with the population: a rule such as "dob and forename
# initial" made 48.6M of 66.5M comparisons at 1M persons (and 1.1M of 1.9M at 100k).
PREDICTION_BLOCKS: tuple[tuple[str, ...] | str, ...] = (
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
    # (Not names with postcode: that compares parents and children who share a name and a
    # home, where the postcode and surname agree because they are a family.)
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


def rule_columns(rule: tuple[str, ...] | str) -> set[str]:
    """The columns a blocking rule equates (of either side, for an SQL rule)."""
    if isinstance(rule, str):
        return {c for pair in re.findall(r"l\.(\w+) = r\.(\w+)", rule) for c in pair}
    return set(rule)


def rule_label(rule: tuple[str, ...] | str) -> str:
    """How reports name a blocking rule."""
    return rule if isinstance(rule, str) else " and ".join(rule)


def rule_creator(rule: tuple[str, ...] | str):
    """The rule as Splink takes it: ``block_on`` for columns, the SQL string as it is."""
    return rule if isinstance(rule, str) else block_on(*rule)


def _name_comparison(name: str, prefix: str, dialect: str, initial: bool) -> cl.CustomComparison:
    dice = dice_sql(f"{prefix}_bf_l", f"{prefix}_bf_r", dialect)
    levels = [
        cll.NullLevel(f"{prefix}_tok"),
        cll.ExactMatchLevel(f"{prefix}_tok", term_frequency_adjustments=True),
        cll.CustomLevel(f"{dice} >= 0.85", label_for_charts="Dice >= 0.85"),
        cll.CustomLevel(f"{prefix}_phon_tok_l = {prefix}_phon_tok_r", label_for_charts="phonetic match"),
        cll.CustomLevel(f"{dice} >= 0.6", label_for_charts="Dice >= 0.6"),
    ]
    if initial:
        levels.append(cll.CustomLevel(f"{prefix}_initial_tok_l = {prefix}_initial_tok_r", label_for_charts="same initial"))
    return cl.CustomComparison(
        output_column_name=name, comparison_levels=[*levels, cll.ElseLevel()],
        comparison_description=f"{name}: exact token, Bloom-filter Dice, phonetic code" + (", initial" if initial else ""),
    )


def _dob_comparison() -> cl.CustomComparison:
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


def _address_comparison(dialect: str) -> cl.CustomComparison:
    dice = dice_sql("addr_bf_l", "addr_bf_r", dialect)
    return cl.CustomComparison(
        output_column_name="address",
        comparison_levels=[
            cll.NullLevel("addr_bf"),
            cll.CustomLevel(f"{dice} >= 0.9", label_for_charts="Dice >= 0.9"),
            cll.CustomLevel(f"{dice} >= 0.7", label_for_charts="Dice >= 0.7"),
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


def model_settings(dialect: str = "duckdb", probability_two_random_records_match: float = 1e-6) -> SettingsCreator:
    """Splink settings for linking and deduplicating the three sources on encodings.

    Args:
        dialect: ``duckdb`` or ``spark`` (the Dice SQL differs).
        probability_two_random_records_match: the prior, refined by training.

    Returns:
        A :class:`splink.SettingsCreator`.
    """
    return SettingsCreator(
        link_type="link_and_dedupe",
        unique_id_column_name="unique_id",
        comparisons=[
            _name_comparison("forename", "fn", dialect, initial=True),
            _name_comparison("surname", "sn", dialect, initial=False),
            _dob_comparison(),
            _postcode_comparison(dialect),
            _address_comparison(dialect),
            exact_level("nino_tok", "nino"),
            exact_level("upn_tok", "upn"),
            exact_level("sex_tok", "sex"),
            exact_level("mn_initial_tok", "middle_initial"),
        ],
        blocking_rules_to_generate_predictions=[rule_creator(r) for r in PREDICTION_BLOCKS],
        probability_two_random_records_match=probability_two_random_records_match,
        retain_matching_columns=False,
        retain_intermediate_calculation_columns=False,
        additional_columns_to_retain=["birth_year"],
    )
