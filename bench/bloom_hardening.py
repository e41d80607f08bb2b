"""How well name Bloom filters separate true matches from non-matches, per hardening choice.

Reads a workspace that has ``staged/`` and ``truth/`` (generate, then ingest). True pairs
are the distinct spellings of one person's forename (or surname) across all records
(typos, nicknames, partial surnames); non-pairs are random pairs of distinct values. For
each hardening, with k chosen for half-full filters, prints the mean Dice of each group
and the area under the ROC curve. The figures in docs/privacy.md come from here.

Usage:
    python -m bench.bloom_hardening WORKSPACE
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import numpy as np

from linkage.db import connect, quote_ident, read_literal
from linkage.encodings import BloomEncoder, BloomParams, dice, hashes_for_half_fill
from linkage.ingest.stage import parquet_source, staged_paths
from linkage.schemas import SOURCES, load_schema


def _pairs(con, ws: str, role: str, rng) -> tuple[list, list]:
    parts = []
    for s in SOURCES:
        col = load_schema(s).columns_with_role(role)[0].name
        rid = load_schema(s).columns_with_role("record_id")[0].name
        parts.append(f"SELECT {quote_ident(rid)} AS record_id, {quote_ident(col)} AS v "
                     f"FROM {parquet_source(staged_paths(Path(ws, 'staged'), s))}")   # every delivery's part
    con.execute(f"""CREATE OR REPLACE TABLE d AS SELECT DISTINCT t.person_id, s.v
                    FROM ({' UNION ALL '.join(parts)}) s JOIN {read_literal(Path(ws, 'truth', 'source_rows.parquet'))} t USING (record_id)
                    WHERE s.v IS NOT NULL""")
    pos = con.execute("SELECT a.v, b.v FROM d a JOIN d b ON a.person_id = b.person_id AND a.v < b.v").fetchall()
    values = [v for (v,) in con.execute("SELECT DISTINCT v FROM d ORDER BY v").fetchall()]
    idx = rng.integers(0, len(values), (5000, 2))
    neg = [(values[i], values[j]) for i, j in idx if i != j]
    return pos, neg


def main(argv: list[str] | None = None) -> int:
    ws = (argv or sys.argv[1:])[0]
    rng = np.random.default_rng(1)
    key = secrets.token_bytes(32)
    con = connect()
    for role, bits in (("first_name", 512), ("surname", 512)):
        pos, neg = _pairs(con, ws, role, rng)
        print(f"{role}: {len(pos)} true pairs with different spellings, {len(neg)} random pairs")
        for hardening in ("none", "balance", "xor_fold"):
            base = {"xor_fold": 2 * bits, "balance": bits // 2, "none": bits}[hardening]
            enc = BloomEncoder(key, BloomParams(bits, hashes_for_half_fill(base, 7), hardening=hardening))
            values = sorted({v for p in pos + neg for v in p})
            filters = dict(zip(values, enc.encode_many(values).to_pylist()))
            sp = np.array([dice(filters[a], filters[b]) for a, b in pos])
            sn = np.array([dice(filters[a], filters[b]) for a, b in neg])
            auc = (sp[:, None] > sn[None, :]).mean() + 0.5 * (sp[:, None] == sn[None, :]).mean()
            print(f"  {hardening:9} k={enc.params.hashes:3}  true pairs {sp.mean():.3f}  random pairs "
                  f"{sn.mean():.3f} +- {sn.std():.3f}  AUC {auc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
