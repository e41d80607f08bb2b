"""Households and parent-child relations from linked persons, on encodings only.

Household membership is decided per year from two kinds of evidence:

* **benefit units**: the claimant, partner and dependants of one claim live together;
* **co-residence**: linked people recorded at the same address in the same year (the
  address is the postcode token and, where a source has one, the address-line Bloom
  filter; a pupil's record carries only a postcode, so it joins the household at that
  postcode when just one address there is known that year).

A household-year is a connected component of person-years joined by that evidence
(Splink's own connected-components clustering), keyed ``H`` + a hash of its smallest
member's person key: the key carries over from year to year while that member stays,
and is stable for a seed and config.

Parent-child relations come from benefit units (an adult claimant or partner and a
dependant child of the same claim) and from co-residence of an adult and a child under 18
with a plausible age gap. Confidence grows with the years of evidence:
``1 - exp(-(1.0 * benefit_unit_years + 0.35 * coresident_years))``, so one year on a claim
gives 0.63, three years living together 0.65, and both together over several years
approach 1.
"""

from __future__ import annotations

import duckdb

from linkage.config import LinkConfig


def _person_birth_sql() -> str:
    # one year of birth per person: the most frequent among its records, ties to the earliest
    # (records can disagree; any_value would pick by row order, which differs between runs)
    return """
        create or replace table person_birth as
        select person_key, -(max({'n': n, 'v': -birth_year})).v as birth_year
        from (select person_key, birth_year, count(birth_year) n from records_linked group by all)
        group by person_key;
    """


def _person_years_sql() -> str:
    # one address per person and year: the most frequent among that year's records
    return _person_birth_sql() + """
        create or replace table addr_obs as
        select person_key, year, postcode_tok,
               postcode_tok || coalesce('|' || md5(hex(addr_bf)), '') as address_key,
               addr_bf is not null as full_address, count(*) n
        from records_linked where postcode_tok is not null group by all;
        create or replace table person_years as
        select person_key, year, birth_year, address_key, postcode_tok, full_address
        from (select a.*, row_number() over (partition by person_key, year
                                              order by full_address desc, n desc, address_key) rn
              from addr_obs a)
        join person_birth using (person_key)
        where rn = 1;
        insert into person_years
        select distinct r.person_key, r.year, b.birth_year, null, null, false
        from records_linked r join person_birth b
             using (person_key)
        where r.bu_role is not null
          and not exists (select 1 from person_years p where p.person_key = r.person_key and p.year = r.year);
        -- integer node ids: the connected-components iterations join on them many times
        create or replace table py_nodes as
        select row_number() over (order by person_key, year) as node_id, * from person_years;
    """


def _edges_sql() -> str:
    return """
        create or replace table hh_edges as
        -- members of one claim, in the claim's year
        with claim as (select distinct r.claim_tok, r.year, n.node_id
                       from records_linked r join py_nodes n using (person_key, year) where r.claim_tok is not null),
        c as (select a.node_id as l, b.node_id as r, 'benefit_unit' as evidence
              from claim a join claim b on a.claim_tok = b.claim_tok and a.year = b.year and a.node_id < b.node_id),
        -- same full address in the same year
        f as (select a.node_id l, b.node_id r, 'address' evidence from py_nodes a join py_nodes b
              on a.address_key = b.address_key and a.year = b.year and a.node_id < b.node_id
              where a.full_address and b.full_address),
        -- a postcode-only record joins the one full address known at that postcode that year
        single as (select postcode_tok, year, any_value(address_key) address_key from py_nodes where full_address
                   group by all having count(distinct address_key) = 1),
        p as (select a.node_id l, b.node_id r, 'postcode' evidence
              from py_nodes a join single s on a.postcode_tok = s.postcode_tok and a.year = s.year
              join py_nodes b on b.address_key = s.address_key and b.year = s.year
              where not a.full_address)
        select distinct l as node_id_l, r as node_id_r, evidence from (select * from c union all select * from f
                                                                         union all select * from p);
    """


def parent_child_sql(cfg: LinkConfig) -> str:
    return _person_birth_sql() + f"""
        create or replace table parent_child as
        with claim as (select claim_tok, year, person_key, bu_role, birth_year from records_linked
                       where claim_tok is not null),
        bu as (select a.person_key parent_key, d.person_key child_key, count(distinct a.year) bu_years
               from claim a join claim d on a.claim_tok = d.claim_tok and a.year = d.year
               where a.bu_role in ('claimant', 'partner') and d.bu_role = 'dependant'
                 and d.birth_year - a.birth_year between {cfg.parent_min_age_gap} and {cfg.parent_max_age_gap}
                 and a.person_key != d.person_key
               group by all),
        co as (select a.person_key parent_key, c.person_key child_key, count(distinct a.year) coresident_years
               from households a join households c on a.household_key = c.household_key and a.year = c.year
               where c.birth_year - a.birth_year between {cfg.parent_min_age_gap} and {cfg.parent_max_age_gap}
                 and a.year - a.birth_year >= 18 and c.year - c.birth_year < 18
               group by all),
        j as (select parent_key, child_key, coalesce(bu_years, 0) bu_years, coalesce(coresident_years, 0) coresident_years
              from bu full join co using (parent_key, child_key))
        select j.*, p.birth_year parent_birth_year, c.birth_year child_birth_year,
               c.birth_year - p.birth_year age_gap,
               round(1 - exp(-(1.0 * bu_years + 0.35 * coresident_years)), 4) confidence
        from j join person_birth p
                    on p.person_key = j.parent_key
               join person_birth c
                    on c.person_key = j.child_key
        order by parent_key, child_key;
    """


def assemble_households(con: duckdb.DuckDBPyConnection, cfg: LinkConfig) -> dict:
    """Build ``households`` (person_key, year, household_key) and ``parent_child`` on ``con``.

    Args:
        con: a DuckDB connection holding ``records_linked`` (record token, person_key, year,
            birth_year, claim_tok, bu_role, postcode_tok, addr_bf).
        cfg: linkage settings (age-gap bounds for parents).

    Returns:
        Counts of household-years, households' mean size and parent-child relations.
    """
    from splink import DuckDBAPI
    from splink.clustering import cluster_pairwise_predictions_at_threshold

    con.execute(_person_years_sql())
    con.execute(_edges_sql())
    clusters = cluster_pairwise_predictions_at_threshold(
        "py_nodes", "hh_edges", DuckDBAPI(connection=con), node_id_column_name="node_id")
    con.execute(f"""
        create or replace table households as
        select n.person_key, n.year, n.birth_year,
               'H' || left(md5(min(n.person_key) over (partition by c.cluster_id)), 16) as household_key
        from py_nodes n join {clusters.physical_name} c using (node_id)
        order by person_key, year""")
    con.execute(parent_child_sql(cfg))
    hh, size, pc = con.execute("""
        select (select count(distinct (household_key, year)) from households),
               (select avg(n) from (select household_key, year, count(*) n from households group by all)),
               (select count(*) from parent_child)""").fetchall()[0]
    return {"household_years": hh, "mean_household_size": round(size or 0, 3), "parent_child_relations": pc}
