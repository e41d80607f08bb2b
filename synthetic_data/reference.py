"""Reference data for the synthetic population: places, names and streets.

Everything is read from CSV files in ``synthetic_data/reference/`` (see its README for
origins) into numpy arrays the generator samples from.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
import numpy as np

from linkage import resources

REFERENCE_DIR = resources.packaged("synthetic_data/reference")

NAME_GROUPS = ("white", "south_asian", "black_african", "east_asian", "other")

# DfE ethnicity codes with approximate shares among England's pupils, and the name
# group each draws its names from.
ETHNICITIES: tuple[tuple[str, float, str], ...] = (
    ("WBRI", 0.700, "white"), ("WIRI", 0.003, "white"), ("WIRT", 0.001, "white"),
    ("WOTH", 0.060, "other"), ("WROM", 0.002, "other"), ("MWBC", 0.015, "white"),
    ("MWBA", 0.006, "black_african"), ("MWAS", 0.010, "south_asian"), ("MOTH", 0.015, "white"),
    ("AIND", 0.030, "south_asian"), ("APKN", 0.040, "south_asian"), ("ABAN", 0.017, "south_asian"),
    ("AOTH", 0.015, "south_asian"), ("BCRB", 0.010, "white"), ("BAFR", 0.035, "black_african"),
    ("BOTH", 0.005, "black_african"), ("CHNE", 0.005, "east_asian"), ("OOTH", 0.020, "other"),
    ("REFU", 0.005, "white"), ("NOBT", 0.003, "white"),
)


def _read(name: str) -> list[dict[str, str]]:
    with open(REFERENCE_DIR / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@dataclass(frozen=True)
class Places:
    """Upper-tier local authorities and their postcode districts."""

    la_code: np.ndarray        # (L,) str
    la_name: np.ndarray        # (L,) str
    region_code: np.ndarray    # (L,) str
    region_name: np.ndarray    # (L,) str
    la_weight: np.ndarray      # (L,) float, sums to 1: share of households placed there
    district: np.ndarray       # (D,) str, sorted by LA
    district_la: np.ndarray    # (D,) int index into la_*
    la_first_district: np.ndarray  # (L,) int: first district of each LA
    la_n_districts: np.ndarray     # (L,) int


@dataclass(frozen=True)
class Names:
    """Name vocabularies with sampling weights by sex and name group."""

    vocab: list[str]                       # every name string; ids index into it
    forenames: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (sex, group) -> (ids, p)
    surnames: dict[str, tuple[np.ndarray, np.ndarray]]               # group -> (ids, p)
    variants: dict[int, list[int]]         # forename id -> variant ids (nicknames, spellings)
    streets: tuple[np.ndarray, np.ndarray]       # (names, p)
    street_types: tuple[np.ndarray, np.ndarray]  # (names, p)


@lru_cache(maxsize=1)
def load_places() -> Places:
    """Load local authorities and postcode districts."""
    las = _read("upper_tier_local_authorities.csv")
    code_index = {r["utla_code"]: i for i, r in enumerate(las)}
    dists = sorted(_read("postcode_districts.csv"), key=lambda r: (code_index[r["utla_code"]], r["postcode_district"]))
    district_la = np.array([code_index[r["utla_code"]] for r in dists], dtype=np.int32)
    n = np.bincount(district_la, minlength=len(las))
    first = np.concatenate([[0], np.cumsum(n)[:-1]])
    # Households are placed in proportion to an LA's number of districts: a rough proxy for
    # population that needs no extra data (London boroughs hold few, large-population districts,
    # so they get a floor of 4).
    w = np.maximum(n, 4).astype(float)
    return Places(
        la_code=np.array([r["utla_code"] for r in las]), la_name=np.array([r["utla_name"] for r in las]),
        region_code=np.array([r["region_code"] for r in las]), region_name=np.array([r["region_name"] for r in las]),
        la_weight=w / w.sum(), district=np.array([r["postcode_district"] for r in dists]),
        district_la=district_la, la_first_district=first.astype(np.int32), la_n_districts=n.astype(np.int32),
    )


@lru_cache(maxsize=1)
def load_names() -> Names:
    """Load forenames, surnames, nickname variants and street names."""
    vocab: list[str] = []
    index: dict[str, int] = {}

    def nid(s: str) -> int:
        if s not in index:
            index[s] = len(vocab)
            vocab.append(s)
        return index[s]

    fore: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    for r in _read("forenames.csv"):
        ids, ws = fore.setdefault((r["sex"], r["group"]), ([], []))
        ids.append(nid(r["name"]))
        ws.append(float(r["weight"]))
    sur: dict[str, tuple[list[int], list[float]]] = {}
    for r in _read("surnames.csv"):
        ids, ws = sur.setdefault(r["group"], ([], []))
        ids.append(nid(r["name"]))
        ws.append(float(r["weight"]))
    variants: dict[int, list[int]] = {}
    for r in _read("nicknames.csv"):
        a, b = nid(r["name"]), nid(r["variant"])
        variants.setdefault(a, []).append(b)
    for k in variants:
        variants[k] = sorted(set(variants[k]))

    def norm(pair: tuple[list[int], list[float]]) -> tuple[np.ndarray, np.ndarray]:
        ids, ws = pair
        p = np.asarray(ws, dtype=float)
        return np.asarray(ids, dtype=np.int32), p / p.sum()

    def table(name: str) -> tuple[np.ndarray, np.ndarray]:
        rows = _read(name)
        p = np.array([float(r["weight"]) for r in rows])
        return np.array([r["name"] for r in rows]), p / p.sum()

    return Names(
        vocab=vocab,
        forenames={k: norm(v) for k, v in fore.items()},
        surnames={k: norm(v) for k, v in sur.items()},
        variants=variants,
        streets=table("streets.csv"),
        street_types=table("street_types.csv"),
    )
