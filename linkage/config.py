"""The typed hhlink configuration, loaded from ``hhlink.toml``.

One :class:`Config` object holds every setting a stage reads. Every field is
documented here, and ``hhlink.toml`` (shipped with the package) holds the defaults.
Unknown keys are errors, so a typo in the config file never passes silently.
Secrets (keys, tokens) are never part of this object: they come from the
environment or key files.

Example:
    >>> from linkage.config import load_config
    >>> cfg = load_config()              # --config, $HHLINK_CONFIG, ./hhlink.toml or the packaged default
    >>> cfg.generate.persons
    20000
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from linkage import resources
from linkage.errors import ConfigError, read_toml

CONFIG_ENV = "HHLINK_CONFIG"
DEFAULT_CONFIG_PATH = resources.default_config()
#: a DuckDB memory limit: an amount ("8GB") or a share of the machine's memory ("60%")
MEMORY_LIMIT = r"^(\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)|([1-9]|[1-8]\d|90)%)$"


class _Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _strict_booleans(cls, data):
        # pydantic reads "yes", "on" and 1 as true: a switch in the config is true or false, nothing else
        if isinstance(data, dict):
            for name, f in cls.model_fields.items():
                if f.annotation is bool and name in data and not isinstance(data[name], bool):
                    raise ValueError(f"{name} must be true or false (a TOML boolean), not {data[name]!r}")
        return data


class ErrorRates(_Section):
    """Identifier error model: the probability that each corruption is applied to a source row.

    Every rate is per eligible row of an extract (a row eligible for a day/month swap
    must have a day of 12 or less, and so on) and every applied corruption is recorded
    in ``truth/corruptions.parquet``.

    Fields:
        name_typo: one character substituted, inserted or deleted in a forename or surname.
        name_transposition: two adjacent characters of a forename or surname swapped.
        nickname: forename recorded as a nickname or spelling variant (William -> Bill).
        hyphenated_surname_partial: a hyphenated or multi-part surname recorded as one
            part, or with a space instead of the hyphen.
        missing_middle_names: middle names left out.
        dob_day_month_swap: day and month of the date of birth swapped.
        dob_wrong_year: the year of birth off by one.
        nino_missing: NINO left blank (benefits claimants/partners and earnings rows).
        nino_mistyped: one digit of the NINO mistyped.
        postcode_typo: one character of the postcode mistyped.
        stale_address: the household's previous address recorded, in the year after a move.
        duplicate_record: the row delivered twice within the source (with its own errors).
        missing_value: an optional identifier (sex, postcode, middle names) left blank.
    """

    name_typo: float = Field(0.02, ge=0, le=1)
    name_transposition: float = Field(0.01, ge=0, le=1)
    nickname: float = Field(0.03, ge=0, le=1)
    hyphenated_surname_partial: float = Field(0.3, ge=0, le=1)
    missing_middle_names: float = Field(0.1, ge=0, le=1)
    dob_day_month_swap: float = Field(0.01, ge=0, le=1)
    dob_wrong_year: float = Field(0.005, ge=0, le=1)
    nino_missing: float = Field(0.03, ge=0, le=1)
    nino_mistyped: float = Field(0.01, ge=0, le=1)
    postcode_typo: float = Field(0.01, ge=0, le=1)
    stale_address: float = Field(0.3, ge=0, le=1)
    duplicate_record: float = Field(0.005, ge=0, le=1)
    missing_value: float = Field(0.01, ge=0, le=1)


class GenerateConfig(_Section):
    """Synthetic population settings (``hhlink generate``).

    Fields:
        persons: how many distinct people the population holds (children, parents,
            step-parents and later partners all count).
        seed: the random seed; a seed and this config determine every output byte.
        start_year: first calendar year observed in the extracts (academic year
            ``start_year/start_year+1``, tax year ``start_year-start_year+1``).
        end_year: last year observed.
        format: file format of the landing extracts, ``csv`` (as departments deliver)
            or ``parquet``.
        ige: planted intergenerational income elasticity: the slope of a child's log
            adult pay (mean at 25-30) on the log of the parents' mean PAYE household
            earnings at the child's ages 10-16, within birth cohort.
        la_effect_sd: standard deviation of the local-authority effect on log pay.
        lone_parent_share: share of families headed by one parent from the start.
        separation_rate: share of couples that separate during the window.
        repartner_rate: share of separated parents with the children who take a new partner.
        move_rate: yearly probability that a household moves.
        move_between_la_share: share of moves that cross a local-authority boundary.
        non_paye_share: share of families with income outside PAYE (self-employment),
            which keeps FSM and PAYE income apart for some families.
        benefit_take_up: share of eligible households that claim income-related benefits.
        surname_change_on_partnership: share of women who take a partner's surname
            when they partner during the window.
        hyphenated_surname_share: share of people with a hyphenated or multi-part surname.
        errors: the identifier error model.
        deliveries: how many of the last monthly deliveries to hold back from ``landing/``
            in ``deliveries/`` (0: everything lands at once); ``hhlink deliver`` drops
            the next one into ``landing/``. See ``synthetic_data.deliveries``.
    """

    persons: int = Field(20000, gt=0, le=20_000_000)
    seed: int = Field(42, ge=0)
    start_year: int = Field(1998, ge=1950, le=2100)
    end_year: int = Field(2025, ge=1950, le=2100)
    format: Literal["csv", "parquet"] = "csv"
    ige: float = Field(0.40, ge=-1, le=2)
    la_effect_sd: float = Field(0.05, ge=0, le=1)
    lone_parent_share: float = Field(0.2, ge=0, le=1)
    separation_rate: float = Field(0.3, ge=0, le=1)
    repartner_rate: float = Field(0.5, ge=0, le=1)
    move_rate: float = Field(0.08, ge=0, le=1)
    move_between_la_share: float = Field(0.3, ge=0, le=1)
    non_paye_share: float = Field(0.1, ge=0, le=1)
    benefit_take_up: float = Field(0.85, ge=0, le=1)
    surname_change_on_partnership: float = Field(0.7, ge=0, le=1)
    hyphenated_surname_share: float = Field(0.04, ge=0, le=1)
    errors: ErrorRates = Field(default_factory=ErrorRates)
    deliveries: int = Field(0, ge=0, le=600)

    @model_validator(mode="after")
    def _years_ordered(self) -> GenerateConfig:
        if self.end_year - self.start_year < 20:
            raise ValueError(
                "end_year must be at least 20 years after start_year so that birth "
                "cohorts have both a childhood and an adulthood in the window"
            )
        return self


class LinkConfig(_Section):
    """Probabilistic linkage settings (``hhlink link``). The trained model itself is Splink JSON in ``linked/``.

    Fields:
        engine: ``duckdb`` (embedded, default) or ``spark`` (Splink's SparkAPI).
        spark_master: Spark master URL when ``engine = "spark"`` (``local[2]`` runs on this machine).
        threshold: match probability at or above which two records are the same person.
        threshold_evidence_bits: ``hhlink link`` also links a pair whose Bayes factor (the match
            weight without the prior) reaches this many bits, whatever its probability (never
            below 0.5). The prior of a random pair falls as the population grows, so a fixed
            probability asks for more evidence the larger the population: at 100,000 persons
            0.999 left out people recorded with full name and date of birth at another address
            (pairwise recall 0.987). 25.5 bits is about 0.9995 at 20,000 persons, so
            ``threshold`` decides there; about 0.997 at 100,000. 0: ``threshold`` alone.
        keep_pairs_above: scored pairs at or above this probability are kept in ``linked/pairs.parquet``
            (for the quality report and sensitivity analyses).
        u_max_pairs: record pairs sampled to estimate u probabilities.
        em_max_pairs: record pairs sampled per EM training blocking rule.
        seed: seed for Splink's random sampling, so training is reproducible.
        parent_min_age_gap: the smallest plausible age gap between a parent and a child.
        parent_max_age_gap: the largest plausible age gap between a parent and a child.
        evaluation_thresholds: thresholds at which ``hhlink evaluate`` and the report give metrics.
        memory_limit: DuckDB's memory limit for ``hhlink link`` and ``hhlink evaluate``: an amount
            (``"8GB"``) or a share of the machine's memory (``"60%"``, the default: the rest is left
            to Arrow's decoding, Splink and the page cache); beyond it DuckDB spills to a temporary
            folder inside the workspace. A monthly delivery at 1,000,000 persons holds about 11 GB
            of link state: under ``"8GB"`` it spilled 7 GB and its link took 107 s, under
            ``"60%"`` of 24 GB 93 s (offline, one run each).
        threads: DuckDB worker threads for linkage; 0 uses every core.
        predict_chunk_identities: prediction is split into chunks of about this many identities
            on each side (Splink's ``num_chunks_left``/``num_chunks_right``), so the join of
            blocked pairs with identities stays within memory at 1M persons.
        incremental: with the stored model reused, score only pairs with an identity that
            gained records since the previous release and carry the previous pairs between
            the others (:mod:`linkage.link.incremental`); persons are clustered from both.
        incremental_max_share: above this share of identities touched, the run is a full one.
        max_drift: the quality gate on model drift (:mod:`linkage.link.drift`): a release whose
            data moved any comparison level's share among predicted matches (m side) or random
            pairs (u side) by more than this, against the stored model's training data, is
            stopped with the level named (absolute, probability points; 1 turns the gate off).
            The training side is the history's newest identities (its latest year), so
            people moving between old and new records is not counted as drift; see
            ``bench/results/drift.md`` for an ordinary and a drifted release.
        drift_min_pairs: the gate judges a release only when at least this many predicted
            matches involve its new records (fewer cannot tell drift from chance).
        drift_sample_side: drift's u side samples this many identities on each side of the
            random pairs (about its square in pairs).
    """

    engine: Literal["duckdb", "spark"] = "duckdb"
    spark_master: str = "local[2]"
    threshold: float = Field(0.999, gt=0, lt=1)
    threshold_evidence_bits: float = Field(25.5, ge=0, lt=200)
    keep_pairs_above: float = Field(0.01, gt=0, lt=1)
    u_max_pairs: float = Field(5e6, gt=0)
    em_max_pairs: float = Field(2e6, gt=0)
    seed: int = Field(1, ge=0)
    parent_min_age_gap: int = Field(15, ge=10, le=30)
    parent_max_age_gap: int = Field(55, ge=30, le=80)
    evaluation_thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.9, 0.99, 0.999])
    memory_limit: str = Field("60%", pattern=MEMORY_LIMIT)
    threads: int = Field(0, ge=0, le=256)
    predict_chunk_identities: int = Field(3_000_000, ge=1000)
    incremental: bool = True
    incremental_max_share: float = Field(0.5, gt=0, le=1)
    max_drift: float = Field(0.2, gt=0, le=1)
    drift_min_pairs: int = Field(200, ge=1)
    drift_sample_side: int = Field(1000, ge=10, le=100_000)

    @model_validator(mode="after")
    def _pairs_below_threshold(self) -> LinkConfig:
        if not self.keep_pairs_above < self.threshold:
            raise ValueError(f"keep_pairs_above ({self.keep_pairs_above}) must be below threshold ({self.threshold})")
        return self


_TYPICAL_LENGTH = {"name": 6, "address": 15}   # characters; measured on the synthetic population


class PseudonymiseConfig(_Section):
    """Pseudonymisation settings (``hhlink pseudonymise``); ``docs/privacy.md`` explains each choice.

    The key is never configured here: it comes from ``HHLINK_KEY``, ``HHLINK_KEY_FILE``,
    ``--key-file`` or ``~/.config/hhlink/master.key`` (see ``linkage/keys.py``).

    Fields:
        q: q-gram length of the Bloom-filter encodings (2 = bigrams); each value is padded
            with q-1 ``_`` on both sides, so a 6-letter name has 7 bigrams.
        name_bits: stored length in bits of the forename and surname filters (``fn_bf``,
            ``sn_bf``); a multiple of 64.
        name_hashes: hash positions per q-gram (k) in the name filters before hardening.
            About half the bits of the unhardened filter are set when k = m ln 2 / g
            (m unhardened bits, g q-grams): with XOR-folding m = 2 x 512 = 1024 and a
            6-letter name's g = 7, k = 101.
        address_bits: stored length in bits of the address-line filter (``addr_bf``).
        address_hashes: k for the address filter: m = 2 x 1024 = 2048, a typical line of
            15 characters has g = 16 bigrams, k = 89.
        hardening: how filters are hardened against frequency and pattern-mining attacks:
            ``xor_fold`` (the filter is built twice as long and its halves XORed),
            ``balance`` (complement appended, keyed permutation) or ``none``.
        level_weight: after hardening, set or clear a few bits in a keyed order so that every
            stored filter has exactly half its bits set: a filter's weight (bits set) is the one
            thing the per-context permutation of its bits cannot hide, and it follows the
            value's length (docs/privacy.md, "Filter weight").
        phonetic: the phonetic code tokenised in ``fn_phon_tok``/``sn_phon_tok``:
            ``metaphone`` (original Metaphone, jellyfish), ``nysiis`` or ``soundex``.
        references: attribute columns that point back to a department's record, never
            copied in clear: each is replaced in the payload by its keyed token, in the
            column named here (``claim_id`` -> ``claim_tok``).
        link_references: reference columns whose token also goes into the identifiers
            zone, for linkage and household assembly.
        member_role_column: the column holding a person's role in the benefit unit
            (claimant, partner, dependant), copied to the identifiers as ``bu_role``.
        period_dates: for a source without a ``period``-role column, the date column whose
            year is the row's ``year``.
        purge_cleartext_after: retention of the cleartext zones. ``"never"`` (the default)
            keeps ``staged/`` and ``quarantine/`` until the next ingest replaces them;
            ``"pseudonymise"`` deletes their Parquet files (every staged and quarantined row,
            in clear) as soon as ``pseudonymised/`` has been published, keeping only
            ``staged/manifest.json`` and ``staged/ledger.json`` (counts and file hashes, no
            record values). Nothing after pseudonymisation reads them; the price is that
            quarantined rows can no longer be inspected, and ``hhlink keys rotate`` or a
            re-run of pseudonymise needs ``hhlink ingest`` again (from ``landing/``, which
            this setting does not touch). See ``docs/privacy.md``.
        postcode_pattern: a regular expression for postcodes that are not UK postcodes, with
            named groups ``district`` and (optionally) ``sector``: the prefixes that give a
            partial agreement level (matched, whole, against the value upper-cased with its
            spaces removed). E.g. Australian postcodes, ``'(?P<sector>(?P<district>\\d{2})\\d)\\d'``.
            Values it does not match, and every value when it is unset, are split as UK
            postcodes (district, then sector = district + the inward digit); values under 5
            characters use their prefixes one and two characters short.
        incremental: pseudonymise only the staged rows of landing files not pseudonymised
            before (a monthly delivery), and carry the previous zone's files, record tokens
            and crosswalk rows over unchanged: the new rows go into files of their own
            (``identifiers/<source>.<n>.parquet``, ``crosswalk.<n>.enc``). A full run happens
            anyway when the key, an encoding setting or a schema version changed, or a file
            pseudonymised before
            has gone from ``staged/`` or changed; ``false`` always runs in full.
        memory_limit: DuckDB's memory limit while encoding (e.g. ``"8GB"``); beyond it DuckDB
            spills to a scratch folder inside the workspace (spill files can hold cleartext).
            The keyed shuffle of a 1,000,000-person extract otherwise held 14 GB.
        threads: DuckDB worker threads; 0 uses every core.
    """

    q: int = Field(2, ge=2, le=3)
    name_bits: int = Field(512, ge=64, le=8192, multiple_of=64)
    name_hashes: int = Field(101, ge=1, le=2000)
    address_bits: int = Field(1024, ge=64, le=8192, multiple_of=64)
    address_hashes: int = Field(89, ge=1, le=2000)
    hardening: Literal["xor_fold", "balance", "none"] = "xor_fold"
    level_weight: bool = True
    phonetic: Literal["metaphone", "nysiis", "soundex"] = "metaphone"
    references: dict[str, str] = Field(
        default_factory=lambda: {"claim_id": "claim_tok", "employer_ref": "employer_tok"})
    link_references: list[str] = Field(default_factory=lambda: ["claim_id"])
    member_role_column: str = "role"
    period_dates: dict[str, str] = Field(default_factory=lambda: {"benefits": "start_date"})
    purge_cleartext_after: Literal["never", "pseudonymise"] = "never"
    postcode_pattern: str | None = None
    incremental: bool = True
    memory_limit: str = Field("8GB", pattern=MEMORY_LIMIT)
    threads: int = Field(0, ge=0, le=256)

    @field_validator("postcode_pattern")
    @classmethod
    def _postcode_pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            groups = re.compile(v).groupindex
        except re.error as exc:
            raise ValueError(f"postcode_pattern is not a valid regular expression ({exc})") from None
        if "district" not in groups:
            raise ValueError("postcode_pattern needs a named group 'district' (and optionally 'sector')")
        return v

    @model_validator(mode="after")
    def _half_fill(self) -> PseudonymiseConfig:
        # refuse a hash count that would leave a typical filter nearly empty or nearly full
        # (e.g. the XOR-folding k kept after switching to balancing)
        import math

        for kind, bits, k in (("name", self.name_bits, self.name_hashes),
                              ("address", self.address_bits, self.address_hashes)):
            base = {"xor_fold": 2 * bits, "balance": bits // 2, "none": bits}[self.hardening]
            grams = _TYPICAL_LENGTH[kind] + self.q - 1
            fill = 1 - math.exp(-k * grams / base)
            if not 0.3 <= fill <= 0.7:
                best = round(base * math.log(2) / grams)
                raise ValueError(f"{kind}_hashes={k} sets {fill:.0%} of the bits of a typical {kind}'s "
                                 f"filter ({base} bits before {self.hardening}); about {best} sets half")
        unknown = [c for c in self.link_references if c not in self.references]
        if unknown:
            raise ValueError(f"link_references {unknown} must also be listed in references")
        return self


class IngestConfig(_Section):
    """Ingest and data-quality gate settings (``hhlink ingest``).

    Distribution bounds and every other expectation live in the suites under
    ``expectations/``, not here.

    Fields:
        max_encoding_error_share: largest share of a CSV's rows that may hold bytes
            invalid in the declared encoding; those rows are quarantined (reason
            ``encoding``), and above this share the file is refused as being in another
            encoding.
        memory_limit: DuckDB's memory limit while staging (e.g. ``"10GB"``); beyond it
            DuckDB spills to a scratch folder in the workspace.
        threads: DuckDB worker threads; 0 uses every core.
        data_docs: build the Great Expectations Data Docs (HTML) in ``reports/quality/``
            as well as the JSON summaries.
        incremental: stage only landing files not staged before (a delivery) and carry the
            earlier files' staged and quarantined rows and manifest entries over; a full run
            when a schema or the staging code changed or an earlier file is gone or changed.
    """

    max_encoding_error_share: float = Field(0.01, ge=0, le=1)
    memory_limit: str = Field("10GB", pattern=MEMORY_LIMIT)
    threads: int = Field(0, ge=0, le=256)
    data_docs: bool = True
    incremental: bool = True


class DisclosureConfig(_Section):
    """Statistical disclosure control for published aggregates (``hhlink disclose``).

    Defaults follow UK trusted-research-environment practice (ACRO/SACRO) and ONS's
    Census 2021 methods; ``docs/disclosure.md`` explains each rule. A cell is one
    combination of a table's dimension categories (margins included); its
    contributors are the distinct persons or households counted in it.

    Fields:
        threshold: fewest contributing units a published cell may have (counts,
            magnitudes, percentiles, proportions and coefficients alike).
        zeros_disclosive: treat empty cells (and proportions of 0 or 1) as disclosive:
            they say something about everyone in a group.
        dominance_n: n of the (n,k) dominance rule: the n largest contributions ...
        dominance_k: ... may not exceed this share of a magnitude cell's total.
        p_percent: the p% rule: a magnitude cell is sensitive when the second-largest
            contributor could estimate the largest to within this fraction
            (``total - x1 - x2 < p * x1``).
        min_dof: fewest residual degrees of freedom (units minus parameters) for a
            released model coefficient such as the elasticity.
        rounding: ``none``, or ``10-5``: counts below ``threshold`` suppressed and every
            published count rounded to the nearest ``rounding_base`` (ONS's 10-5 rule).
            Cannot be combined with ``perturb``.
        rounding_base: the rounding base of the ``10-5`` option.
        perturb: apply cell-key perturbation to published standard tables (tables built
            on request are always perturbed).
        count_ptable: the count p-table: probabilities of adding -D..+D to a published
            count (odd length, symmetric, sums to 1); near the threshold the row is
            truncated symmetrically so no count is pushed below it.
        magnitude_noise: scale m of magnitude perturbation: a sum moves by
            ``m * d * x1`` (x1 the largest contribution, d from the magnitude p-table).
        magnitude_levels: L, the magnitude p-table: d is one of +-1/L, +-2/L, ..., +-1,
            each with probability 1/(2L), chosen by the cell key. ``m / L`` must exceed
            ``p_percent``: then removing one person (not the largest contributor) from a
            cell always moves its noise by more than p% of that person's value.
        quantile_window: percentiles and medians are the mean of this many contributors'
            values around the percentile's rank, never one person's value.
        protection_count: the adversary's feasible interval for a suppressed count must
            reach at least this far above the true value (and this far below, or to zero).
        protection_ratio: ... and at least this fraction of the true value, for counts
            and magnitude totals; a cell failing the p% rule needs its p% shortfall too.
        lp_max_rounds: rounds of secondary suppression (audit, add complements) before
            giving up and suppressing every cell of the table.
        request_max_lps: the most linear programs the disclosure audit of one on-demand
            request may solve (jointly with what was released before); a request needing
            more is refused, so no request can tie up the portal.
        on_demand_audit: what an on-demand answer is audited against besides itself:
            ``all`` (default), everything released before it, the standard tables and every
            earlier answer (only the groups of withheld cells it can reach are re-audited, see
            :func:`linkage.sdc.ledger.coupled`); ``published``, the standard tables of the
            current release only (weaker: two answers together can narrow a cell).
        missing_categories: ``exclude``: a table's population is the units with a known
            category on each of its dimensions (its title says so), so no ``Unknown`` column
            of empty cells forces suppression; ``unknown``: missing categories become an
            ``Unknown`` category.
        ci_replicates: bootstrap replicates behind the confidence interval of each published
            mobility measure (elasticity, rank-rank slope, absolute upward mobility).
        ci_level: the intervals' confidence level.
        ci_max_width: per measure name, the widest interval a reliable estimate may have;
            a wider one is marked ``low`` reliability (or withheld, see ``ci_action``).
        ci_action: ``mark``: publish low-reliability estimates with ``reliability = low``
            (as ONS marks estimates); ``suppress``: withhold them.
        cohort_band: standard tables group birth cohorts into bands of this many years.
        allowed_dimensions: the dimensions a table request may use (``build_table``); the
            catalogue in ``linkage/sdc/standard.py`` defines each.
        allowed_measures: the measures a table request may ask for (``build_table``).
    """

    threshold: int = Field(10, ge=2, le=1000)
    zeros_disclosive: bool = True
    dominance_n: int = Field(2, ge=1, le=10)
    dominance_k: float = Field(0.9, gt=0, lt=1)
    p_percent: float = Field(0.10, ge=0, lt=1)
    min_dof: int = Field(10, ge=1)
    rounding: Literal["none", "10-5"] = "none"
    rounding_base: int = Field(5, ge=2, le=100)
    perturb: bool = True
    count_ptable: list[float] = Field(default_factory=lambda: [0.05, 0.2, 0.5, 0.2, 0.05])
    magnitude_noise: float = Field(0.5, ge=0, le=5)
    magnitude_levels: int = Field(4, ge=1, le=100)
    quantile_window: int = Field(5, ge=2, le=100)
    protection_count: float = Field(5, ge=0)
    protection_ratio: float = Field(0.10, ge=0, le=1)
    lp_max_rounds: int = Field(200, ge=1)
    request_max_lps: int = Field(500, ge=1)
    on_demand_audit: Literal["published", "all"] = "all"
    missing_categories: Literal["exclude", "unknown"] = "exclude"
    ci_replicates: int = Field(200, ge=20, le=5000)
    ci_level: float = Field(0.95, gt=0.5, lt=1)
    ci_max_width: dict[str, float] = Field(default_factory=lambda: {
        "ige": 0.4, "rank_slope": 0.4, "absolute_upward_mobility": 20.0})
    ci_action: Literal["mark", "suppress"] = "mark"
    cohort_band: int = Field(5, ge=1, le=20)
    allowed_dimensions: list[str] = Field(default_factory=lambda: [
        "region", "la", "cohort", "sex", "ethnicity", "parent_income_quintile", "child_income_quintile",
        "household_income_quintile", "fsm_ever", "persistent_fsm", "fsm_years_band", "benefit_spell"])
    allowed_measures: list[str] = Field(default_factory=lambda: [
        "count", "mean_ks2", "mean_ks4", "median_ks4", "mean_pay_25_30", "median_pay_25_30",
        "neet_rate"])

    @model_validator(mode="after")
    def _consistent(self) -> DisclosureConfig:
        p = self.count_ptable
        if len(p) % 2 != 1 or any(x < 0 for x in p) or abs(sum(p) - 1) > 1e-9:
            raise ValueError("count_ptable must have odd length, non-negative entries summing to 1")
        if any(abs(a - b) > 1e-12 for a, b in zip(p, reversed(p))):
            raise ValueError("count_ptable must be symmetric (unbiased noise)")
        if self.magnitude_noise and self.magnitude_noise / self.magnitude_levels <= self.p_percent:
            raise ValueError("magnitude_noise / magnitude_levels must exceed p_percent (differencing protection)")
        if self.rounding != "none" and self.perturb:
            raise ValueError("rounding = '10-5' and perturb = true cannot be combined: choose one")
        return self


class ServiceConfig(_Section):
    """The researcher and auditor portal (``hhlink serve``); ``linkage/serve/`` implements it.

    Users and their token hashes live in the workspace (``service/users.json``, made by
    ``hhlink users add``), never here; the audit log is ``audit/log.jsonl``.

    Fields:
        host: address the HTTP service binds to; the loopback address by default, so the
            portal is reachable only from this machine (put a TLS proxy in front otherwise).
        port: TCP port of the HTTP service.
        daily_quota: table-builder requests each user may make per UTC day (answered or
            refused by disclosure control alike; a request over the quota gets HTTP 429).
        max_cells: largest table the builder computes, in cells (margins included,
            estimated from the dimensions' categories before any data is read); larger
            requests are refused with HTTP 422, since the linear-programming audit of
            secondary suppression grows with the number of suppressed cells.
        builder_concurrency: table-builder requests computed at the same time; the rest wait.
        builder_cache: protected tables kept in memory for repeated requests (the same
            request gets the same perturbed answer anyway, so a cached answer reveals nothing new).
        session_minutes: a web session ends after this many minutes without a request.
        session_max_minutes: a web session ends this many minutes after sign-in however active it is
            (then the user signs in again with their token).
        audit_fsync: flush every audit entry to disk (``fsync``) before answering; safer
            against a crash, slower under load.
    """

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    daily_quota: int = Field(50, ge=0, le=1_000_000)
    max_cells: int = Field(2000, ge=1, le=1_000_000)
    builder_concurrency: int = Field(1, ge=1, le=16)
    builder_cache: int = Field(256, ge=0, le=100_000)
    session_minutes: int = Field(60, ge=1, le=24 * 60)
    session_max_minutes: int = Field(480, ge=1, le=7 * 24 * 60)
    audit_fsync: bool = False


class AssembleConfig(_Section):
    """Research tables and mobility measures (``hhlink assemble``); ``docs/research.md`` defines each measure.

    Fields:
        project: the research project's id. Keys in ``research/`` are derived from the
            master key for this project (HKDF purpose ``project:<id>``), so two projects'
            extracts hold different keys for the same person and cannot be joined.
        childhood_ages: first and last age (inclusive) of the childhood window over which
            parental earnings and household income are averaged.
        adult_pay_ages: ages over which a child's adult PAYE pay is averaged (years with pay).
        neet_ages: ages over which years with neither a pupil record nor PAYE pay are
            counted (the NEET proxy).
        min_parent_confidence: parent-child relations below this confidence are left out
            of the cohort table and the measures (all stay in ``research/parent_child``).
        persistent_fsm_share: share of school years on FSM from which a child counts as
            persistently disadvantaged.
        long_spell_months: a benefit spell at least this long counts as long (the
            disadvantage measure ``long_benefit_spell``).
        bootstrap_replicates: bootstrap replicates behind every confidence interval.
        bootstrap_seed: the bootstrap's seed (same seed and data: same intervals).
        confidence_level: coverage of the percentile bootstrap intervals.
        min_group_size: groups (birth cohort, region, LA) with fewer children in a
            measure's sample get no estimate.
        sensitivity_thresholds: match-probability thresholds at which persons are
            re-clustered from ``linked/pairs.parquet`` and the headline measures
            re-estimated (the linkage-error sensitivity analysis).
        la_lookup: CSV with ``utla_code`` and ``region_code`` columns: the ONS lookup of
            upper-tier local authorities to regions (relative to the project root).
        memory_limit: DuckDB's memory limit while assembling (spills to the workspace beyond it).
        threads: DuckDB worker threads; 0 uses every core.
        data_docs: build Great Expectations Data Docs for the research tables' suite.
        research_pay_rounding: pay in the research extracts (``person_year.paye_pay``,
            ``household_year.paye_income`` and ``equivalised_income``) is rounded to this
            many pounds (a positive pay never below one unit), so two projects' extracts
            cannot be joined on exact (year, pay) values; 0 keeps exact pay, for a project
            approved to need it. The measures are computed on exact pay either way.
    """

    project: str = Field("hhlink-demo", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    childhood_ages: tuple[int, int] = (10, 16)
    adult_pay_ages: tuple[int, int] = (25, 30)
    neet_ages: tuple[int, int] = (16, 24)
    min_parent_confidence: float = Field(0.0, ge=0, le=1)
    persistent_fsm_share: float = Field(0.8, gt=0, le=1)
    long_spell_months: float = Field(24.0, gt=0)
    bootstrap_replicates: int = Field(200, ge=0, le=10_000)
    bootstrap_seed: int = Field(1, ge=0)
    confidence_level: float = Field(0.95, gt=0, lt=1)
    min_group_size: int = Field(20, ge=3)
    sensitivity_thresholds: list[float] = Field(default_factory=lambda: [0.9, 0.99, 0.9999])
    research_pay_rounding: int = Field(1000, ge=0, le=100_000)
    la_lookup: Path = Path("synthetic_data/reference/upper_tier_local_authorities.csv")
    memory_limit: str = Field("8GB", pattern=MEMORY_LIMIT)
    threads: int = Field(0, ge=0, le=256)
    data_docs: bool = True

    @model_validator(mode="after")
    def _ages_ordered(self) -> AssembleConfig:
        for name in ("childhood_ages", "adult_pay_ages", "neet_ages"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 100:
                raise ValueError(f"{name} must be [first, last] with 0 <= first <= last <= 100")
        if any(not 0 < t < 1 for t in self.sensitivity_thresholds):
            raise ValueError("sensitivity_thresholds must lie strictly between 0 and 1")
        return self


class FlowConfig(_Section):
    """Orchestration: the Prefect flow's quality gates and its schedule (``hhlink run``, ``hhlink schedule``).

    A run stops before ``disclose`` when a gate fails, leaving ``published/`` as it was
    and the flow run marked failed with the reason. The linkage gates read
    ``reports/linkage/report.json`` (written by ``hhlink link``).

    Fields:
        min_expected_precision: the smallest acceptable pairwise precision the Splink model
            expects at the linkage threshold (the mean match probability of the pairs at or
            above it: ``expected_vs_true.expected_precision_at_threshold`` in the report).
            Synthetic runs measure 0.9999 at 1,500 to 100,000 persons.
        min_match_rate: per source, the smallest acceptable share of its records that link
            to a person also seen in another source (``match_rates[].with_another_source``).
            A source missing from the report fails the gate. Measured on the synthetic
            population at 100,000 persons: education 0.995, benefits 0.98, earnings 0.87
            (earnings holds adults who never claimed and left school before 1998).
        schedule: cron expression of the served deployment (``hhlink schedule``); the
            default runs at 06:00 on the first day of every month.
        timezone: IANA time zone the cron expression is read in.
        deployment: the name of the served deployment (``monthly-release/<name>``).
    """

    min_expected_precision: float = Field(0.99, ge=0, le=1)
    min_match_rate: dict[str, float] = Field(
        default_factory=lambda: {"education": 0.95, "benefits": 0.90, "earnings": 0.75})
    schedule: str = Field("0 6 1 * *", min_length=9)
    timezone: str = "Europe/London"
    deployment: str = Field("monthly", pattern=r"^[A-Za-z0-9._-]+$")

    @model_validator(mode="after")
    def _known_sources(self) -> FlowConfig:
        from linkage.schemas import SOURCES

        unknown = sorted(set(self.min_match_rate) - set(SOURCES))
        if unknown:
            raise ValueError(f"min_match_rate: unknown source(s) {unknown}; sources are {list(SOURCES)}")
        if any(not 0 <= v <= 1 for v in self.min_match_rate.values()):
            raise ValueError("min_match_rate values must lie between 0 and 1")
        if len(self.schedule.split()) != 5:
            raise ValueError("schedule must be a five-field cron expression, e.g. '0 6 1 * *'")
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r} is not an IANA time zone (e.g. 'Europe/London')") from None
        return self


class PathsConfig(_Section):
    """Where the contracts live.

    Relative paths here and elsewhere in the config (e.g. ``assemble.la_lookup``) are read
    from the config file's folder when they exist there, otherwise from hhlink's packaged
    defaults of the same name (see :func:`linkage.resources.resolve`).

    Fields:
        schemas: folder of source and output schemas.
        expectations: folder of Great Expectations suites.
    """

    schemas: Path = Path("schemas")
    expectations: Path = Path("expectations")
    _base: Path | None = PrivateAttr(None)   # the config file's folder, set by load_config

    def resolve(self, path: Path) -> Path:
        """Return ``path`` as a file-system path: the config file's folder, else the packaged default."""
        return resources.resolve(path, self._base)


class Config(_Section):
    """The whole hhlink configuration.

    Fields:
        generate: synthetic population settings.
        link: probabilistic linkage settings.
        pseudonymise: keyed encodings, Bloom-filter parameters and department references.
        ingest: ingest and data-quality gate settings.
        paths: where schemas and expectation suites live.
        assemble: research tables, mobility measures and the linkage-error sensitivity analysis.
        disclosure: disclosure-control rules and parameters for published tables.
        service: the researcher and auditor portal (``hhlink serve``).
        flow: the Prefect flow's quality gates and monthly schedule.
    """

    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)
    pseudonymise: PseudonymiseConfig = Field(default_factory=PseudonymiseConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    assemble: AssembleConfig = Field(default_factory=AssembleConfig)
    disclosure: DisclosureConfig = Field(default_factory=DisclosureConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    _source: tuple[Path, str] | None = PrivateAttr(None)
    _defaulted: tuple[str, ...] = PrivateAttr(())

    @property
    def defaulted_sections(self) -> tuple[str, ...]:
        """Sections absent from the config file, so every value in them is the default."""
        return self._defaulted

    @property
    def source(self) -> tuple[Path, str] | None:
        """The file this config was read from and why that one (``None`` when built in code)."""
        return self._source


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}'"
    return f"{source}: {where}: {first['msg'].removeprefix('Value error, ')}"


def find_config(path: Path | str | None = None) -> tuple[Path, str]:
    """Choose the config file: ``path`` (``--config``), ``$HHLINK_CONFIG``, ``./hhlink.toml``, the packaged default.

    Returns:
        The file and why it was chosen (``--config``, ``HHLINK_CONFIG``,
        ``./hhlink.toml`` or ``packaged default``).

    Raises:
        ConfigError: ``HHLINK_CONFIG`` names a file that does not exist.

    Example:
        >>> find_config("my.toml")
        (PosixPath('my.toml'), '--config')
    """
    if path is not None:
        return Path(path), "--config"
    env = os.environ.get(CONFIG_ENV)
    if env:
        if not Path(env).is_file():
            raise ConfigError(f"{env}: config file not found (named by {CONFIG_ENV})")
        return Path(env), CONFIG_ENV
    local = Path.cwd() / resources.CONFIG_NAME
    if local.is_file():
        return local, f"./{resources.CONFIG_NAME}"
    return DEFAULT_CONFIG_PATH, "packaged default"


def load_config(path: Path | str | None = None, **overrides: dict) -> Config:
    """Load and validate the configuration.

    Args:
        path: a TOML file; default the first of ``$HHLINK_CONFIG``, ``./hhlink.toml`` and
            the packaged ``hhlink.toml`` (:func:`find_config`). Relative paths inside it
            resolve against its folder, then the packaged defaults.
        overrides: section dictionaries merged over the file, e.g.
            ``generate={"persons": 1000}``.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: unreadable file, bad TOML, an unknown key or a bad value,
            with a one-line message naming the file and the key.

    Example:
        >>> load_config(generate={"persons": 500}).generate.persons
        500
    """
    path, reason = find_config(path)
    data = read_toml(path, ConfigError, "config file")
    for section, values in overrides.items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path))) from None
    cfg._source = (path.absolute(), reason)
    cfg.paths._base = path.absolute().parent
    cfg._defaulted = tuple(name for name in Config.model_fields if name not in data)
    if len(cfg._defaulted) == len(Config.model_fields):
        raise ConfigError(f"{path}: the config file sets nothing (no section); "
                          f"copy the packaged hhlink.toml and change what you need")
    lookup = cfg.paths.resolve(cfg.assemble.la_lookup)
    if not lookup.is_file():
        raise ConfigError(f"{path}: assemble.la_lookup: file not found ({lookup})")
    return cfg
