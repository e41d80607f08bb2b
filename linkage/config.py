"""The typed hhlink configuration, loaded from ``hhlink.toml``.

One :class:`Config` object holds every setting a stage reads. Every field is
documented here, and ``hhlink.toml`` at the project root holds the defaults.
Unknown keys are errors, so a typo in the config file never passes silently.
Secrets (keys, tokens) are never part of this object: they come from the
environment or key files.

Example:
    >>> from linkage.config import load_config
    >>> cfg = load_config()              # the project's hhlink.toml
    >>> cfg.generate.persons
    20000
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from linkage.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "hhlink.toml"


class _Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
        keep_pairs_above: scored pairs at or above this probability are kept in ``linked/pairs.parquet``
            (for the quality report and sensitivity analyses).
        u_max_pairs: record pairs sampled to estimate u probabilities.
        em_max_pairs: record pairs sampled per EM training blocking rule.
        seed: seed for Splink's random sampling, so training is reproducible.
        parent_min_age_gap: the smallest plausible age gap between a parent and a child.
        parent_max_age_gap: the largest plausible age gap between a parent and a child.
        evaluation_thresholds: thresholds at which ``hhlink evaluate`` and the report give metrics.
    """

    engine: Literal["duckdb", "spark"] = "duckdb"
    spark_master: str = "local[2]"
    threshold: float = Field(0.99, gt=0, lt=1)
    keep_pairs_above: float = Field(0.01, gt=0, lt=1)
    u_max_pairs: float = Field(5e6, gt=0)
    em_max_pairs: float = Field(2e6, gt=0)
    seed: int = Field(1, ge=0)
    parent_min_age_gap: int = Field(15, ge=10, le=30)
    parent_max_age_gap: int = Field(55, ge=30, le=80)
    evaluation_thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.9, 0.99, 0.999])


class PathsConfig(_Section):
    """Where the contracts live.

    Fields:
        schemas: folder of source and output schemas (relative to the project root).
        expectations: folder of Great Expectations suites (relative to the project root).
    """

    schemas: Path = Path("schemas")
    expectations: Path = Path("expectations")

    def resolve(self, path: Path) -> Path:
        """Return ``path`` made absolute against the project root."""
        return path if path.is_absolute() else PROJECT_ROOT / path


class Config(_Section):
    """The whole hhlink configuration.

    Fields:
        generate: synthetic population settings.
        link: probabilistic linkage settings.
        paths: where schemas and expectation suites live.
    """

    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}'"
    return f"{source}: {where}: {first['msg']}"


def load_config(path: Path | str | None = None, **overrides: dict) -> Config:
    """Load and validate the configuration.

    Args:
        path: a TOML file; default the project's ``hhlink.toml``.
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
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for section, values in overrides.items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path))) from None
