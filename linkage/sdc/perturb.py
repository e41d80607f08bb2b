"""Cell-key perturbation (ONS/ABS method) and 10-5 rounding of published values.

Every unit has a record key, a keyed hash of its research key (HKDF purpose
``sdc:record-key``) read as a number in [0, 1). A cell's key is the sum of its units'
record keys modulo 1, so the same set of units always gives the same cell key, and so the
same noise, in every table and every request: averaging repeated requests learns nothing.

**Counts** get integer noise ``d`` read from the count p-table (config ``count_ptable``,
default ``[0.05, 0.2, 0.5, 0.2, 0.05]`` for d = -2..+2: unbiased, variance 0.8) at the
cell key: ``d`` is the first value whose cumulative probability exceeds the key. A count
within D of the threshold uses the row truncated symmetrically to ``|d| <= n - threshold``
(and renormalised), so no published count falls below the threshold and noise stays
unbiased.

**Magnitudes** (sums, means, percentiles) move by ``m * d * s``, where ``m`` is
``magnitude_noise``, ``d`` is read from the magnitude p-table (``+-1/L, +-2/L, ..., +-1``,
each with probability ``1/(2L)``, ``L = magnitude_levels``) at a second cell key built from
the units' second record keys and the measure's name, and ``s`` is the cell's largest
absolute contribution (for a percentile: the spread of its window). Noise is never zero.

Differencing: the second record keys lie in ``[2**32/(2L), 2**32 - 2**32/(2L)]``, so
removing any one unit from a cell moves its second cell key by at least one p-table
bucket and always changes ``d``. When that unit is not the cell's largest contributor,
``s`` is unchanged, and an attacker who subtracts the two published totals is off by
``m * s * |d_A - d_B| >= (m / L) * s``, more than ``p_percent`` of the unit's value (the
config requires ``m / L > p``). When it is the largest contributor, the two scales
differ and the error is usually, but not provably, as large.

**Rounding** (``rounding = "10-5"``): published counts are rounded half-up to the nearest
``rounding_base``.
"""

from __future__ import annotations

import hashlib

import numpy as np

from linkage.config import DisclosureConfig
from linkage.sdc.cells import KEY_MODULUS


def count_ptable(cfg: DisclosureConfig) -> dict[str, object]:
    """The count p-table as documented in the data dictionary: noise values and probabilities."""
    D = len(cfg.count_ptable) // 2
    return {"noise": list(range(-D, D + 1)), "probability": list(cfg.count_ptable),
            "truncation": f"rows for threshold <= n < threshold + {D} keep |d| <= n - threshold, renormalised"}


def count_noise(n: np.ndarray, cell_key: np.ndarray, cfg: DisclosureConfig) -> np.ndarray:
    """Integer noise for counts ``n`` at cell keys in [0, 1) (0 for counts below the threshold).

    Example:
        >>> cfg = DisclosureConfig()
        >>> count_noise(np.array([100, 100, 100, 10]), np.array([0.01, 0.5, 0.99, 0.99]), cfg).tolist()
        [-2, 0, 2, 0]
    """
    p = np.asarray(cfg.count_ptable, dtype=float)
    D = len(p) // 2
    out = np.zeros(len(n), dtype=np.int64)
    room = np.minimum(D, np.asarray(n) - cfg.threshold)
    for r in range(0, D + 1):
        sel = room == r
        if not sel.any():
            continue
        probs = p[D - r:D + r + 1] / p[D - r:D + r + 1].sum()
        cum = np.cumsum(probs)
        cum[-1] = 1.0 + 1e-12
        out[sel] = np.searchsorted(cum, np.asarray(cell_key)[sel], side="right") - r
    return out


def key_margin(levels: int) -> int:
    """The smallest shift of a magnitude cell key (in units of 2**-32) that always changes its p-table bucket."""
    return -(-KEY_MODULUS // (2 * levels))


def measure_offset(name: str) -> int:
    """A fixed rotation of the magnitude cell key per measure, so two measures of one cell draw differently."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big")


def magnitude_d(cell_key: np.ndarray, levels: int) -> np.ndarray:
    """The magnitude p-table lookup at integer cell keys in [0, 2**32): ``+-k/L``, k = 1..L, equally likely.

    The 2L buckets are consecutive ranges of the key of width 2**32/(2L); two keys at least
    that far apart (modulo 2**32) are in different buckets and so get different noise.

    Example:
        >>> magnitude_d(np.array([0, 2**31 - 1, 2**31, 2**32 - 1]), 2).tolist()
        [-1.0, -0.5, 0.5, 1.0]
    """
    vals = np.concatenate([-np.arange(levels, 0, -1), np.arange(1, levels + 1)]) / levels
    i = (np.asarray(cell_key, dtype=np.uint64) * np.uint64(2 * levels)) >> np.uint64(32)
    return vals[i.astype(np.int64)]


def round_counts(n: np.ndarray, base: int) -> np.ndarray:
    """Round half-up to the nearest ``base``.

    Example:
        >>> round_counts(np.array([10, 12, 13, 17.5]), 5).tolist()
        [10.0, 10.0, 15.0, 20.0]
    """
    return base * np.floor(np.asarray(n, dtype=float) / base + 0.5)
