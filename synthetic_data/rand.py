"""Seeded randomness and small vectorised helpers shared by the generator."""

from __future__ import annotations

import zlib

import numpy as np


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """A generator for one purpose: adding a new purpose never shifts the others' streams."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def explode(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand inclusive integer ranges: return (index of the range, value) per element."""
    n = np.maximum(end - start + 1, 0)
    idx = np.repeat(np.arange(len(start), dtype=np.int32), n)
    offs = np.arange(int(n.sum()), dtype=np.int64)
    offs -= np.repeat(np.cumsum(n) - n, n)
    offs += start[idx]
    return idx, offs


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fast deterministic hash of integers (uint64 out)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def group_starts(keys: np.ndarray) -> np.ndarray:
    """Boolean mask: True where a sorted key array starts a new group."""
    out = np.ones(len(keys), dtype=bool)
    out[1:] = keys[1:] != keys[:-1]
    return out


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is slow on tens of millions of ints)."""
    k = np.sort(x)
    return k[group_starts(k)]


def ffill_index(valid: np.ndarray) -> np.ndarray:
    """Index of the last valid position at or before each position (0 if none)."""
    idx = np.where(valid, np.arange(len(valid)), 0)
    return np.maximum.accumulate(idx) if len(idx) else idx


def choice_by_group(rng: np.random.Generator, groups: np.ndarray,
                    tables: dict, default) -> np.ndarray:
    """Draw one id per element from ``tables[group] = (ids, p)``; unknown groups use ``default``."""
    out = np.empty(len(groups), dtype=np.int32)
    for g in sorted(set(groups.tolist())):
        mask = groups == g
        ids, p = tables.get(g, tables[default])
        out[mask] = ids[rng.choice(len(ids), size=int(mask.sum()), p=p)]
    return out
