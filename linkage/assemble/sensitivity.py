"""Alternative links for the linkage-error sensitivity analysis.

Each function replaces the link tables ``linkage.assemble.sql`` reads (``id_person``,
``households``, ``parent_child``) on the connection, so the same panel SQL re-estimates
the measures under other links:

* :func:`recluster` - persons re-clustered from ``linked/pairs.parquet`` at another match
  threshold (Splink's connected components);
* :func:`true_persons` - persons from the ground truth (records joined to true persons
  through the crosswalk, as ``hhlink evaluate`` does);
* :func:`true_links` - persons, households and parent-child relations all from the truth.

For the first two, household membership is carried over from the linkage's own households
(``households_base``: each new person-year takes the household most of its identities'
old person-years were in; ``id_base`` maps each identity to its person in the linkage) and
parent-child relations are re-derived from it with the linkage's rules
(:mod:`linkage.link.households`), so only person-level linkage changes. ``id_person`` and
``households`` are views over the chosen variant's tables; ``parent_child`` is a table
(the households module writes it by that name). Keys are integers: a re-clustered person's
is negative (minus its cluster's first node, minus one), so it never meets a linkage key; a
true person's is its truth id. True persons are per identity: the true
person most of an identity's records belong to (identities are records equal on every
identifier encoding, so they almost never mix people).

:class:`Incremental` computes the threshold variants without rebuilding everyone: only
pairs scored between the two thresholds can split or join persons. A person whose
identities cluster exactly as before keeps the linkage's households, relations and cohort
row; the persons that split or join get households and relations re-derived as above, and
only the children related to them or living with them are rebuilt
(``tests/test_assemble.py`` checks the rebuilt cohort against a full rebuild on the same
links).
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb

from linkage.config import LinkConfig
from linkage.link.households import parent_child_sql

# the cohort columns the headline measures read (``linkage.assemble.sql.headline_cohort_sql``)
HEADLINE_COLUMNS = ("child_key", "birth_year", "parents_earnings", "log_parents_earnings", "adult_pay",
                    "log_adult_pay")


def _households_sql(ids: str, target: str) -> str:
    """``target``: household per person-year for the persons of the identity map ``ids`` (unique_id, person_key).

    A person-year takes the household most of its identities' records were in under the
    linkage's persons; ``birth_year`` is the person's most common year of birth.
    """
    return f"""
        create or replace table {target} as
        with m as (select v.person_key, y.year, h.household_key, sum(y.n) n
                   from {ids} v join id_years y using (unique_id) join id_base b using (unique_id)
                   join households_base h on h.person_key = b.base_key and h.year = y.year
                   group by all),
        yob as (select person_key, max({{'n': n, 'v': -birth_year}}).v * -1 birth_year
                from (select v.person_key, b.birth_year, sum(b.n) n from {ids} v join id_birth b using (unique_id)
                      group by all) group by 1)
        select m.person_key, m.year, yob.birth_year, max({{'n': m.n, 'h': m.household_key}}).h household_key
        from m join yob using (person_key) group by all
    """


def _records_linked_sql(claims: str, births: str) -> str:
    """``records_linked`` as the parent-child rules read it: the claim members in ``claims`` and one birth row per person.

    Claim rows carry the person's year of birth (not the record's), so every row of a
    person agrees and the rules' ``any_value`` is deterministic.
    """
    return f"""
        create or replace table records_linked as
        with members as (select r.record_token, v.person_key, r.year, r.claim_tok, r.bu_role
                         from recs r join id_person v using (unique_id) where r.claim_tok in ({claims})),
        yob as (select person_key, birth_year from ({births}))
        select m.record_token, m.person_key, m.year, y.birth_year, m.claim_tok, m.bu_role
        from members m join yob y using (person_key)
        union all
        select null, person_key, null, birth_year, null, null from yob
    """


def _person_births_sql(persons: str) -> str:
    """(person_key, birth_year) of the persons in ``persons``: the most common year of birth of their identities."""
    return f"""
        select person_key, max({{'n': n, 'v': -birth_year}}).v * -1 birth_year
        from (select v.person_key, b.birth_year, sum(b.n) n from id_person v join id_birth b using (unique_id)
              where v.person_key in ({persons}) group by all) group by 1"""


def _rehouse(con: duckdb.DuckDBPyConnection, cfg: LinkConfig) -> None:
    """Households and parent-child relations for the persons in ``id_person``, from the base households."""
    con.execute(_households_sql("id_person", "households_v"))
    con.execute("create or replace view households as select * from households_v")
    con.execute(_records_linked_sql("select claim_tok from recs where claim_tok is not null",
                                    _person_births_sql("select person_key from id_person")))
    con.execute(parent_child_sql(cfg))


def _true_identities(con: duckdb.DuckDBPyConnection) -> None:
    """``id_person`` from the truth: each identity's most common true person (needs ``rec_truth``)."""
    con.execute("""
        create or replace table id_person_v as
        select unique_id, max({'n': n, 'v': -truth_person}).v * -1 person_key
        from (select r.unique_id, t.truth_person, count(*) n from rec_truth t join recs r using (record_token)
              group by all) group by 1;
        create or replace view id_person as select * from id_person_v;
    """)


def _persons(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("select count(distinct person_key) from id_person").fetchall()[0][0]


def _cluster(con: duckdb.DuckDBPyConnection, nodes: str, pairs: str, threshold: float, node: str = "unique_id") -> str:
    """Connected components of ``pairs`` at or above ``threshold`` over ``nodes``; returns the clusters' table."""
    from splink import DuckDBAPI
    from splink.clustering import cluster_pairwise_predictions_at_threshold

    clusters = cluster_pairwise_predictions_at_threshold(
        nodes, pairs, DuckDBAPI(connection=con), node_id_column_name=node,
        threshold_match_probability=threshold)
    return clusters.physical_name


def recluster(con: duckdb.DuckDBPyConnection, threshold: float, cfg: LinkConfig) -> int:
    """Every person re-clustered at ``threshold``, households and relations re-derived; returns the persons' count.

    Needs ``identity_nodes`` (unique_id) and ``pairs`` (unique_id_l, unique_id_r, match_probability).
    """
    clusters = _cluster(con, "identity_nodes", "pairs", threshold)
    con.execute(f"""
        create or replace table id_person_v as
        select unique_id, -cluster_id - 1 person_key from {clusters};
        create or replace view id_person as select * from id_person_v""")
    _rehouse(con, cfg)
    return _persons(con)


class Incremental:
    """Threshold variants rebuilt only where persons change (see the module docstring).

    Args:
        con: the panel connection: inputs loaded and ``t_cohort`` built on the linkage's links.
        cfg: linkage settings (the parent-child rules).
        base_threshold: the threshold the linkage's persons were clustered at.
        headline: builds the headline ``t_cohort`` (:data:`HEADLINE_COLUMNS`) from the
            current links, only for the children in the named table of person keys.
        cohorts: a condition on ``t_cohort.birth_year`` (and ``w``, the data window): the
            birth cohorts the headline measures read.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, cfg: LinkConfig, base_threshold: float,
                 headline: Callable[[str], None], cohorts: str):
        self.con, self.cfg, self.base, self.headline = con, cfg, base_threshold, headline
        con.execute(f"""
            create or replace table households_rb as select * from households_base;
            create or replace table parent_child_rb as select * from parent_child_base;
            create or replace table t_cohort_rb as
            select {", ".join(HEADLINE_COLUMNS)} from t_cohort, data_window w where {cohorts};
        """)

    def _joins(self, threshold: float) -> None:
        """``v_new`` below the base threshold: persons joined by pairs between the thresholds.

        Only a pair between two different persons can join them, so the persons are the
        nodes and those pairs the edges; a component of two or more persons is a new person.
        """
        con = self.con
        con.execute(f"""
            create or replace table v_person_pairs as
            select distinct least(l.base_key, r.base_key) base_key_l, greatest(l.base_key, r.base_key) base_key_r,
                   1.0 match_probability
            from pairs p join id_base l on l.unique_id = p.unique_id_l join id_base r on r.unique_id = p.unique_id_r
            where p.match_probability >= {threshold!r} and p.match_probability < {self.base!r}
              and l.base_key <> r.base_key;
            create or replace table v_person_nodes as
            select base_key_l as base_key from v_person_pairs union select base_key_r from v_person_pairs;
        """)
        if not con.execute("select count(*) from v_person_nodes").fetchall()[0][0]:
            con.execute("create or replace table v_new as select unique_id, base_key person_key from id_base limit 0")
            return
        clusters = _cluster(con, "v_person_nodes", "v_person_pairs", 0.5, node="base_key")
        con.execute(f"""
            create or replace table v_new as
            select b.unique_id, -c.cluster_id - 1 person_key
            from {clusters} c join id_base b using (base_key)
            where c.cluster_id in (select cluster_id from {clusters} group by 1 having count(*) > 1)""")

    def _splits(self, threshold: float) -> None:
        """``v_new`` above the base threshold: persons split when pairs between the thresholds drop out.

        Only a person holding such a pair can split: its identities are clustered again on
        the pairs at or above ``threshold``; a cluster holding all of one person's identities
        is that person, unchanged.
        """
        con = self.con
        con.execute(f"""
            create or replace table v_candidates as
            select distinct b.base_key from pairs p join id_base b on b.unique_id = p.unique_id_l
            where p.match_probability >= {self.base!r} and p.match_probability < {threshold!r};
            create or replace table v_nodes as
            select unique_id, base_key from id_base where base_key in (select base_key from v_candidates);
            create or replace table v_pairs as
            select p.* from pairs p join v_nodes l on l.unique_id = p.unique_id_l join v_nodes r on r.unique_id = p.unique_id_r
            where p.match_probability >= {threshold!r};
        """)
        if not con.execute("select count(*) from v_nodes").fetchall()[0][0]:
            con.execute("create or replace table v_new as select unique_id, base_key person_key from id_base limit 0")
            return
        clusters = _cluster(con, "v_nodes", "v_pairs", threshold)
        con.execute(f"""
            create or replace table v_new as
            with m as (select c.unique_id, c.cluster_id, n.base_key from {clusters} c join v_nodes n using (unique_id)),
            size as (select base_key, count(*) n from v_nodes group by 1),
            changed as (select m.cluster_id from m join size using (base_key) group by m.cluster_id
                        having count(distinct m.base_key) > 1 or count(*) <> max(size.n))
            select unique_id, -cluster_id - 1 person_key from m
            where cluster_id in (select cluster_id from changed)""")

    def variant(self, threshold: float) -> int:
        """Links and ``t_cohort`` at ``threshold``; returns the persons' count."""
        con = self.con
        if threshold < self.base:
            self._joins(threshold)
        elif threshold > self.base:
            self._splits(threshold)
        else:
            con.execute("create or replace table v_new as select unique_id, base_key person_key from id_base limit 0")
        con.execute("""create or replace table v_touched as
                       select distinct b.base_key from v_new join id_base b using (unique_id)""")
        con.execute("""
            create or replace table id_person_v as
            select b.unique_id, coalesce(n.person_key, b.base_key) person_key
            from id_base b left join v_new n using (unique_id);
            create or replace view id_person as select * from id_person_v;
        """)
        con.execute(_households_sql("v_new", "v_households_new"))
        con.execute("""
            create or replace table households_v as
            select * from households_rb where person_key not in (select base_key from v_touched)
            union all select * from v_households_new;
            create or replace table v_hy as
            select distinct household_key, year from v_households_new;
            create or replace table v_claims as
            select distinct r.claim_tok from recs r join v_new n using (unique_id) where r.claim_tok is not null;
            -- the parent-child rules over the household-years and claims with a new person only
            create or replace view households as
            select h.* from households_v h join v_hy using (household_key, year);
        """)
        con.execute(_records_linked_sql(
            "select claim_tok from v_claims",
            _person_births_sql("select person_key from households union select v.person_key from recs r "
                               "join id_person v using (unique_id) where r.claim_tok in (select claim_tok from v_claims)")))
        con.execute(parent_child_sql(self.cfg))
        con.execute("""
            create or replace table v_pc_new as
            select * from parent_child where parent_key in (select person_key from v_new)
                                          or child_key in (select person_key from v_new);
            create or replace table parent_child as
            select parent_key, child_key, confidence, bu_years, coresident_years, age_gap from parent_child_rb
            where parent_key not in (select base_key from v_touched) and child_key not in (select base_key from v_touched)
            union all select parent_key, child_key, confidence, bu_years, coresident_years, age_gap from v_pc_new;
            create or replace view households as select * from households_v;
            -- children whose row may change: new persons, children of new or split parents, and
            -- children living with a new person (their household's size may change)
            create or replace table v_redo as
            select person_key from v_new
            union select child_key from v_pc_new
            union select child_key from parent_child_rb where parent_key in (select base_key from v_touched)
            union select h.person_key from households_v h join v_hy using (household_key, year);
        """)
        # build only the rows to redo, reading the persons they need
        con.execute("""
            create or replace table v_needed as
            select person_key from v_redo
            union select parent_key from parent_child where child_key in (select person_key from v_redo);
            create or replace view id_person as
            select * from id_person_v where person_key in (select person_key from v_needed);
        """)
        self.headline("v_redo")
        con.execute(f"""
            create or replace view id_person as select * from id_person_v;
            create or replace table t_cohort as
            select * from t_cohort_rb where child_key not in (select person_key from v_redo)
                                        and child_key not in (select base_key from v_touched)
            union all select {", ".join(HEADLINE_COLUMNS)} from t_cohort;
        """)
        return _persons(con)


def true_persons(con: duckdb.DuckDBPyConnection, cfg: LinkConfig) -> int:
    """Persons from the truth (needs ``rec_truth``: record_token, truth_person); returns the persons' count."""
    _true_identities(con)
    _rehouse(con, cfg)
    return _persons(con)


def true_links(con: duckdb.DuckDBPyConnection) -> int:
    """Persons, households and parent-child relations from the truth, for the person-years the data observe.

    Needs ``rec_truth`` (record_token, truth_person), ``truth_py`` (person_id, year,
    household_id) and ``truth_pc`` (parent_id, child_id). Returns the persons' count.
    """
    _true_identities(con)
    con.execute("""
        create or replace table households_v as
        with seen as (select distinct v.person_key, y.year from id_person v join id_years y using (unique_id)),
        yob as (select person_key, max({'n': n, 'v': -birth_year}).v * -1 birth_year
                from (select v.person_key, b.birth_year, sum(b.n) n from id_person v join id_birth b using (unique_id)
                      group by all) group by 1)
        select s.person_key, s.year, yob.birth_year, t.household_id household_key
        from seen s join truth_py t on t.person_id = s.person_key and t.year = s.year
        join yob using (person_key);
        create or replace view households as select * from households_v;
        create or replace table parent_child as
        with persons as (select distinct person_key from id_person)
        select t.parent_id parent_key, t.child_id child_key, 1.0 confidence,
               0 bu_years, 0 coresident_years, 0 age_gap
        from truth_pc t
        where t.parent_id in (select person_key from persons) and t.child_id in (select person_key from persons);
    """)
    return _persons(con)
