"""Anchored blocking: prediction rules whose comparisons grow with the population, not its square.

Each identity (a distinct set of encodings within a source) of a person is compared with
each identity of another person the rules bring together, so a rule such as "same date of
birth and forename sound" makes, for two people who happen to share them, as many
comparisons as the product of their identities (about five each on the generator's
population). Those chance meetings grow with the square of the population: at 1M persons
they were 10.6M of 23.8M comparisons, and the count grew 16.6x for 10x the persons.

Anchors remove the product without losing a link. Identities equal on a NINO, on a UPN, or
on forename, surname and date of birth together are joined into anchor groups (connected
components, by label propagation); those pairs are compared by the anchor rules
(:data:`ANCHOR_RULES`), which come first, and then every pair within a group (a chain of
them joins identities with nothing in common: an identity with a typo gets every identity of
its group to match, not only the one it shares a value with). Every other rule then compares
only :data:`REPRESENTATIVES` identities per anchor group and rule key - those with most
records - instead of all of them: the rest of the group reaches the same people through its
group. ``bench/blocking.py`` scores this against the truth: the share of true identity pairs
joined by a chain of compared true pairs (the most clustering can link) is 0.999747 at 100k
persons and 0.999731 at 1M (0.999747 and 0.999742 without anchors, measured on the same
identities when this was built), for 35% fewer
comparisons at 1M and 11.7x growth for 10x the persons (16.6x before). With one
representative the 20,000-person evaluation lost 0.0002 of pairwise recall (a record with a
typo had fewer chances to match); with two it holds.

The rule keys are computed here, at link time, as short hashes of the tokens a rule
equates; they are never written to a zone. ``bench/blocking.py`` measures the counts at
100k and 1M persons.
"""

from __future__ import annotations

import re

import duckdb

from linkage.link.model import PREDICTION_BLOCKS, rule_label

__all__ = ["ANCHOR_RULES", "AnchoredRule", "anchored_rules", "rule_sides", "build_blocking_keys", "update_blocking_keys"]

# identities equal on any of these are one anchor group; pairs within a group are compared
# by these rules themselves (first, in this order)
ANCHOR_RULES: tuple[tuple[str, ...], ...] = (("nino_tok",), ("upn_tok",), ("fn_tok", "sn_tok", "dob_tok"))
REPRESENTATIVES = 2   # identities per anchor group and rule key an anchored rule compares (most records first)
MAX_GROUP = 100      # identities in an anchor group above which its members are not all compared
MAX_ITERATIONS = 50   # label propagation; an unfinished group only means more comparisons, never fewer


class AnchoredRule:
    """One prediction rule as Splink runs it, with the label reports show.

    ``rule`` is a tuple of columns (equal on both sides) or SQL over ``l.``/``r.``;
    ``keys`` the derived key columns it reads (``(column,)`` for a same-column rule,
    ``(left, right)`` for a rule equating different columns), empty for an anchor rule;
    ``sides`` the columns each key hashes (none for the anchor rules and the same-group rule,
    whose columns :func:`build_blocking_keys` makes itself).
    """

    def __init__(self, rule, label: str, keys: tuple[str, ...] = (), sides: tuple = ()):
        self.rule, self.label, self.keys, self.sides = rule, label, keys, sides

    def __repr__(self) -> str:
        return f"AnchoredRule({self.label!r})"


def rule_sides(rule) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The columns a rule equates, left side and right side, in matching order."""
    if not isinstance(rule, str):
        return tuple(rule), tuple(rule)
    pairs = re.findall(r"\bl\.(\w+)\s*=\s*r\.(\w+)", rule)
    rest = re.sub(r"\bl\.\w+\s*=\s*r\.\w+", "", rule)
    if not pairs or re.sub(r"\bAND\b|\s|\(|\)", "", rest, flags=re.I):
        raise ValueError(f"blocking rule {rule!r}: only a conjunction of l.x = r.y can be anchored")
    return tuple(a for a, _ in pairs), tuple(b for _, b in pairs)


def anchored_rules(rules=PREDICTION_BLOCKS) -> list[AnchoredRule]:
    """The rules prediction runs: the anchor rules, then every other rule on its derived keys."""
    out = [AnchoredRule(r, rule_label(r)) for r in ANCHOR_RULES]
    # the rest of each anchor group: identities joined through a chain (a NINO to one identity,
    # name and date of birth to another) are compared directly too, so an identity with a
    # typo has every identity of its group to match, not only the one it shares a value with
    # (groups up to MAX_GROUP identities: a placeholder NINO shared by thousands stays with its own rule)
    out.append(AnchoredRule(("anchor_group",), "same anchor group (through a chain of the rules above)",
                            ("anchor_group",)))
    for i, rule in enumerate(rules):
        if not isinstance(rule, str) and tuple(rule) in ANCHOR_RULES:
            continue
        left, right = rule_sides(rule)
        label = f"{rule_label(rule)} (anchored)"
        if left == right:
            out.append(AnchoredRule((f"blk_{i}",), label, (f"blk_{i}",), (left,)))
        else:
            out.append(AnchoredRule(f"l.blk_{i}_a = r.blk_{i}_b", label, (f"blk_{i}_a", f"blk_{i}_b"), (left, right)))
    return out


def _key(cols: tuple[str, ...]) -> str:
    """SQL: a 63-bit hash of the columns' values, NULL when any is NULL (equal values, equal keys)."""
    present = " AND ".join(f"{c} IS NOT NULL" for c in cols)
    return f"CASE WHEN {present} THEN (hash({', '.join(cols)}) >> 1)::BIGINT END"


def build_blocking_keys(con: duckdb.DuckDBPyConnection, table: str = "identities",
                        out: str = "blocking_keys", rules: list[AnchoredRule] | None = None) -> dict:
    """Table ``out`` (``unique_id``, ``anchor`` and each rule's key columns) for ``table``'s identities.

    A key column holds the rule's key for the :data:`REPRESENTATIVES` identities that
    represent their anchor group under that key (most records, then the smallest
    ``unique_id``: deterministic) and NULL for the others, so equality on it compares a few
    identities per group and key; ``anchor_group`` is the group of 2 to :data:`MAX_GROUP`
    identities (NULL otherwise), for the same-group rule. Returns
    facts: anchor groups and the label-propagation rounds.
    """
    rules = rules if rules is not None else anchored_rules()
    keys = [_key(cols) for cols in ANCHOR_RULES]
    con.execute(f"""CREATE OR REPLACE TEMP TABLE __hh_anchor AS SELECT unique_id, unique_id AS anchor,
        {', '.join(f'{k} AS g{n}' for n, k in enumerate(keys))} FROM {table}""")
    rounds = 0
    for rounds in range(1, MAX_ITERATIONS + 1):
        # each identity takes the smallest anchor of any identity it shares a group with
        least = ", ".join(f"CASE WHEN g{n} IS NOT NULL THEN min(anchor) OVER (PARTITION BY g{n}) ELSE anchor END"
                          for n in range(len(keys)))
        con.execute(f"""CREATE OR REPLACE TEMP TABLE __hh_next AS
            SELECT * EXCLUDE (anchor), least(anchor, {least}) AS anchor, anchor AS before FROM __hh_anchor""")
        changed = con.execute("SELECT count(*) FROM __hh_next WHERE anchor <> before").fetchall()[0][0]
        con.execute("DROP TABLE __hh_anchor; ALTER TABLE __hh_next RENAME TO __hh_anchor; "
                    "ALTER TABLE __hh_anchor DROP COLUMN before")
        if not changed:
            break
    keyed, selects = [], []
    for r in rules:
        for key, cols in zip(r.keys, r.sides):
            keyed.append(f"{_key(cols)} AS {key}")
            selects.append(f"""CASE WHEN row_number() OVER (PARTITION BY {key}, anchor
                                   ORDER BY n_records DESC, unique_id) <= {REPRESENTATIVES} THEN {key} END AS {key}""")
    con.execute(f"""CREATE OR REPLACE TABLE {out} AS
        WITH k AS (SELECT i.unique_id, i.n_records, a.anchor{''.join(', ' + s for s in keyed)}
                   FROM {table} i JOIN __hh_anchor a USING (unique_id))
        SELECT unique_id, anchor,
               CASE WHEN count(*) OVER (PARTITION BY anchor) BETWEEN 2 AND {MAX_GROUP} THEN anchor END AS anchor_group
               {''.join(', ' + s for s in selects)} FROM k""")
    groups = con.execute("SELECT count(DISTINCT anchor) FROM __hh_anchor").fetchall()[0][0]
    con.execute("DROP TABLE __hh_anchor")
    return {"anchor_groups": int(groups), "anchor_rounds": rounds}


def update_blocking_keys(con: duckdb.DuckDBPyConnection, table: str, out: str, rules: list[AnchoredRule],
                         previous: str, touched: str, rebuilt_table: str | None = None) -> dict:
    """Table ``out`` as :func:`build_blocking_keys` gives it for ``table``, rebuilt only where ``touched`` reaches.

    ``previous`` holds the keys of the previous release's identities (``build_blocking_keys``'
    columns, from :mod:`linkage.link.state`) and becomes ``out`` (it is renamed); ``touched`` the identities that are new or gained
    records. An identity's keys depend only on its anchor group (label propagation stays inside
    a connected component, and the representatives are chosen per group by ``n_records`` and
    ``unique_id``), and a group's identities change only through a touched identity: a new one
    may join groups, an old one that gained records may become a representative. So the
    affected groups are those of the touched identities and of every identity sharing an
    anchor key with one; their identities (a union of whole components, closed under the
    anchor keys) are rebuilt with :func:`build_blocking_keys` and every other identity keeps its
    previous keys. The rounds a group needs are its own, so a rebuilt group ends as in a full
    build, converged or stopped at :data:`MAX_ITERATIONS` alike.

    With ``rebuilt_table``, that table is left holding the rebuilt identities (unique_id): every
    other identity's keys are its ``previous`` ones.

    Returns:
        facts: anchor groups (all), the rebuild's rounds and the identities rebuilt.
    """
    keys = [_key(cols) for cols in ANCHOR_RULES]
    g = [f"g{n}" for n in range(len(keys))]
    con.execute(f"""CREATE OR REPLACE TEMP TABLE __hh_g AS
        SELECT unique_id, {', '.join(f'{k} AS g{n}' for n, k in enumerate(keys))} FROM {table}""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE __hh_tg AS SELECT * FROM __hh_g SEMI JOIN {touched} USING (unique_id)""")
    reach = " OR ".join(f"{c} IN (SELECT {c} FROM __hh_tg WHERE {c} IS NOT NULL)" for c in g)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE __hh_affected AS
        WITH near AS (SELECT unique_id FROM __hh_g WHERE {reach} UNION SELECT unique_id FROM {touched}),
             groups AS (SELECT DISTINCT p.anchor FROM {previous} p SEMI JOIN near USING (unique_id))
        SELECT unique_id FROM near
        UNION SELECT p.unique_id FROM {previous} p SEMI JOIN groups USING (anchor)""")
    # only the columns the keys hash: the identities' encodings are most of their bytes
    used = sorted({"unique_id", "n_records", *(c for cols in ANCHOR_RULES for c in cols),
                   *(c for r in rules for side in r.sides for c in side)})
    con.execute(f"""CREATE OR REPLACE TEMP TABLE __hh_subset AS SELECT {', '.join(used)} FROM {table}
                    SEMI JOIN __hh_affected USING (unique_id)""")
    facts = build_blocking_keys(con, "__hh_subset", "__hh_rebuilt", rules)
    # ``previous`` becomes ``out`` in place, its affected rows replaced: a copy of every identity's
    # keys took 5-6 s of a monthly delivery at 1,000,000 persons. An identity of ``previous`` no
    # longer in ``table`` goes too.
    con.execute(f"""ALTER TABLE {previous} RENAME TO {out};
        DELETE FROM {out} WHERE unique_id IN (SELECT unique_id FROM __hh_affected)
                             OR unique_id NOT IN (SELECT unique_id FROM {table});
        INSERT INTO {out} BY NAME SELECT * FROM __hh_rebuilt""")
    rebuilt = con.execute("SELECT count(*) FROM __hh_affected").fetchall()[0][0]
    groups = con.execute(f"SELECT count(DISTINCT anchor) FROM {out}").fetchall()[0][0]
    if rebuilt_table is not None:
        con.execute(f"CREATE OR REPLACE TABLE {rebuilt_table} AS SELECT unique_id FROM __hh_affected")
    con.execute("DROP TABLE __hh_g; DROP TABLE __hh_tg; DROP TABLE __hh_affected; DROP TABLE __hh_subset; "
                "DROP TABLE __hh_rebuilt")
    return {"anchor_groups": int(groups), "anchor_rounds": facts["anchor_rounds"], "identities_rebuilt": int(rebuilt)}
