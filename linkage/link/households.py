"""Households and parent-child relations from linked persons, on encodings only.

Household membership is decided per year from two kinds of evidence:

* **benefit units**: the claimant, partner and dependants of one claim live together;
* **co-residence**: linked people recorded at the same address in the same year.

An *address* is the postcode token and, where a source has one, the address-line Bloom
filter. Address lines recorded differently at one postcode are one address when their
filters' Dice coefficient is at least ``household_address_dice`` (probabilistic evidence
rather than exact equality). A pupil's record carries only a postcode: it joins the one
full address known at that postcode that year, or, when none is known, the other
postcode-only records there (siblings on the school roll).

Each person-year gets one address, with evidence across years:

* among several addresses in one year, the one the person still holds in a later year is
  preferred (the other is a previous address left on file after a move);
* a *stale* address is replaced (the household moved; one source had not caught up): a
  person recorded at address A whose next address is B, while someone else moved into B
  that year, lives at B; so does a person left alone at A who leaves it later, when someone
  who lived at A is at B that year; so does a person recorded at A as the claimant or partner
  of a benefit unit that nobody else at A belongs to, while others live at A, when the unit is
  new that year or claims at B later (they had set up a household of their own at B);
* an address seen for one person in one year only (a mistyped postcode) and a missing
  address are filled from the person's addresses before and after when those agree; a
  missing address, or a postcode seen once without an address line, also from an adjacent
  year at the edge of the person's records (a full address seen once may be a new home).

Every observed person-year is a node, so people with no address evidence are households of
their own rather than missing. A household-year is a connected component of person-years
joined by that evidence (Splink's own connected-components clustering), keyed ``H`` + a
hash of its smallest member's person key: the key carries over from year to year while
that member stays, and is stable for a seed and config.

Each person-year carries ``confidence``, a score of its membership evidence:
``1 - exp(-w)`` with ``w`` = 1.0 for a shared claim, 1.0 for a full address recorded that
year (0.7 for a postcode only, 0.5 for an address inferred from other years: stale,
mistyped or missing), 0.3 per further record at that address that year (at most two), and
1.0 for each of the years before and after at the same address (most errors are around a
move). ``hhlink evaluate`` reports household accuracy by band of this score.

Parent-child relations come from benefit units (an adult claimant or partner and a
dependant child of the same claim) and from co-residence of an adult and a child or young
adult (under ``CHILD_MAX_AGE``, 25) with a plausible age gap, unless the adult is a young adult living with someone old enough
to be the parent of both (an older sibling). Confidence grows with the years of evidence:
``1 - exp(-(1.0 * benefit_unit_years + 0.35 * coresident_strength))``, where a year living
together counts 1, times 0.6 when the younger is 18 or over and times 0.5 when either is
placed that year by a postcode alone or by other years, on one record and no claim; so one year on a claim gives 0.63, three years living
together 0.65, and both together over several years approach 1. Evidence across years adds to
the exponent (:func:`_cross_year_sql`): 0.7 for an adult and a dependant of one benefit unit on
different claims, 0.5 for spells at one address that interleave without a year observed together,
0.7 for the partner of the child's parent just before the birth.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import duckdb

from linkage.config import LinkConfig
from linkage.db import read_literal
from linkage.encodings import dice_sql
from linkage.link.linked_records import record_files, records_relation

ADDRESS_DICE = 0.9   # address-line filters at one postcode at least this similar are one address
# co-residence counts as parent-child evidence while the younger is under this age: children
# leave home at 18-24, and an adult living with someone 15-55 years older is most often their child
CHILD_MAX_AGE = 25


def _person_birth_sql() -> str:
    # one year of birth per person: the most frequent among its records, ties to the earliest
    # (records can disagree; any_value would pick by row order, which differs between runs)
    return """
        create or replace table person_birth as
        select person_key, -(max({'n': n, 'v': -birth_year})).v as birth_year
        from (select person_key, birth_year, count(birth_year) n from records_linked group by all)
        group by person_key;
    """


def _addresses_sql(dice: float = ADDRESS_DICE, source: str = "records_linked") -> str:
    """``addr_canon``: each distinct (postcode, address filter) -> one address key.

    Filters at one postcode within ``dice`` of each other (``addr_near``, each filter with
    itself too) share the key of the smallest (by hex) among them; a postcode-only
    observation keys on the postcode alone. ``source``: the records (all, or every record at
    some postcodes: each postcode's keys depend on its own records only).
    """
    d = dice_sql("a.addr_bf", "b.addr_bf")
    return f"""
        create or replace table addr_full as
        select distinct postcode_tok, addr_bf, hex(addr_bf) addr_hex from {source}
        where postcode_tok is not null and addr_bf is not null;
        create or replace table addr_near as
        select a.postcode_tok, a.addr_hex, b.addr_hex near_hex
        from addr_full a join addr_full b
             on a.postcode_tok = b.postcode_tok and (a.addr_hex = b.addr_hex or {d} >= {dice});
        create or replace table addr_canon as
        select postcode_tok, addr_hex, postcode_tok || '|' || left(md5(min(near_hex)), 16) as address_key,
               min(near_hex) canon_hex
        from addr_near group by postcode_tok, addr_hex;
    """


def _observations_sql() -> str:
    """``pya``: person-year-address observations, postcode-only ones resolved where they can be."""
    return """
        create or replace table pya_raw as
        select r.person_key, r.year, r.postcode_tok,
               coalesce(c.address_key, r.postcode_tok || '|') as address_key,
               c.address_key is not null as full_address, count(*) n
        from records_linked r left join addr_canon c
             on c.postcode_tok = r.postcode_tok and c.addr_hex = hex(r.addr_bf)
        where r.postcode_tok is not null group by all;
        -- a postcode-only record joins the one full address known at its postcode that year,
        -- else the one known there in any year (so a pupil's address is the same key every year)
        create or replace table pc_single as
        select postcode_tok, year, min(address_key) address_key from pya_raw where full_address
        group by all having count(distinct address_key) = 1;
        create or replace table pc_single_ever as
        select postcode_tok, min(address_key) address_key from pya_raw where full_address
        group by all having count(distinct address_key) = 1;
        create or replace table pya as
        select p.person_key, p.year, coalesce(s.address_key, e.address_key, p.address_key) address_key,
               bool_or(p.full_address) full_address, bool_or(not p.full_address) pc_only, sum(p.n) n
        from pya_raw p
        left join pc_single s on not p.full_address and s.postcode_tok = p.postcode_tok and s.year = p.year
        left join pc_single_ever e on not p.full_address and e.postcode_tok = p.postcode_tok
             and not exists (select 1 from pya_raw x where x.full_address and x.postcode_tok = p.postcode_tok
                                                        and x.year = p.year)
        group by all;
    """


def _person_years_sql(dice: float = ADDRESS_DICE) -> str:
    """``person_years``: one address (or none) per observed person-year, with evidence across years."""
    dice_prev, dice_next = dice_sql("lc.addr_bf", "lp.addr_bf"), dice_sql("lc.addr_bf", "ln.addr_bf")
    return _person_birth_sql() + _addresses_sql(dice) + _observations_sql() + f"""
        create or replace table obs_py as select distinct person_key, year from records_linked;
        -- an address seen for one person in one year only is weak: a mistyped postcode, usually
        create or replace table addr_support as
        select address_key, count(*) person_years from pya group by 1;
        create or replace table pya_s as
        select p.*, s.person_years = 1 as lone,
               max(p.year) over (partition by p.person_key, p.address_key) as last_year_here
        from pya p join addr_support s using (address_key);
        -- first choice per person-year: not lone, still held later, full, most records
        create or replace table py_first as
        select person_key, year, address_key, full_address, n, lone from (
            select *, row_number() over (partition by person_key, year
                order by lone, (last_year_here > year) desc, full_address desc, n desc, address_key) rn
            from pya_s)
        where rn = 1;
        -- the person's previous and next known (not lone) addresses, by year
        create or replace table py_ctx as
        select o.person_key, o.year, f.address_key, f.full_address, f.n, coalesce(f.lone, false) lone,
               last_value(case when not f.lone then f.address_key end ignore nulls) over (
                   partition by o.person_key order by o.year rows between unbounded preceding and 1 preceding) prev_addr,
               last_value(case when not f.lone then o.year end ignore nulls) over (
                   partition by o.person_key order by o.year rows between unbounded preceding and 1 preceding) prev_year,
               first_value(case when not f.lone then f.address_key end ignore nulls) over (
                   partition by o.person_key order by o.year rows between 1 following and unbounded following) next_addr,
               first_value(case when not f.lone then o.year end ignore nulls) over (
                   partition by o.person_key order by o.year rows between 1 following and unbounded following) next_year
        from obs_py o left join py_first f using (person_key, year);
        -- stale: recorded at A, next at B, and someone else moved into B this year; or recorded
        -- at A and leaving it, while the others from A are at B and nobody else is left at A
        create or replace table here as select address_key, year, count(*) n from py_ctx
        where address_key is not null group by all;
        create or replace table unit_py as
        select distinct benefit_unit_tok unit, person_key, year, bu_role from records_linked
        where benefit_unit_tok is not null;
        create or replace table stale as
        select distinct c.person_key, c.year, c.next_addr new_addr
        from py_ctx c
        join py_ctx q on q.year = c.year and q.address_key = c.next_addr and q.person_key != c.person_key
                     and q.prev_addr != q.address_key
        where c.next_addr != c.address_key
        union
        select c.person_key, c.year, min(q.address_key)
        from py_ctx c
        join py_ctx q on q.year = c.year and q.prev_addr = c.address_key and q.address_key != c.address_key
                     and not q.lone
        join here h on h.address_key = c.address_key and h.year = c.year and h.n = 1
        where c.next_addr is distinct from c.address_key and c.prev_addr = c.address_key
        group by all having count(distinct q.address_key) = 1
        union
        -- or recorded at A, next at B, as the claimant or partner of a benefit unit that nobody else
        -- at A belongs to, while others live at A, and whose claims in a later year are at B:
        -- the person had set up a household of their own at B (a young adult leaving home)
        select c.person_key, c.year, c.next_addr
        from py_ctx c join unit_py u on u.person_key = c.person_key and u.year = c.year
        where c.next_addr != c.address_key and u.bu_role in ('claimant', 'partner')
          and (not exists (select 1 from unit_py f where f.unit = u.unit and f.year < c.year)
               or exists (select 1 from unit_py v join py_ctx d on d.person_key = v.person_key and d.year = v.year
                          where v.unit = u.unit and v.year > c.year and d.address_key = c.next_addr))
          and exists (select 1 from py_ctx o where o.year = c.year and o.address_key = c.address_key
                         and o.person_key != c.person_key)
          and not exists (select 1 from unit_py w join py_ctx e on e.person_key = w.person_key and e.year = c.year
                          where w.unit = u.unit and w.person_key != c.person_key and e.address_key = c.address_key);
        -- a missing or once-seen address, filled from the years around it
        create or replace table lines as select distinct address_key, unhex(canon_hex) addr_bf from addr_canon;
        create or replace table py_fill as
        select c.*, case when c.address_key is null or c.lone then case
                   when c.prev_addr = c.next_addr then c.prev_addr
                   -- the same address line under a postcode seen once: a mistyped postcode
                   when {dice_prev} >= {dice} then c.prev_addr
                   when {dice_next} >= {dice} then c.next_addr
                   when not coalesce(c.full_address, false) and c.next_addr is null and c.year - c.prev_year = 1
                        then c.prev_addr
                   when not coalesce(c.full_address, false) and c.prev_addr is null and c.next_year - c.year = 1
                        then c.next_addr end end as filled
        from py_ctx c left join lines lc on lc.address_key = c.address_key
        left join lines lp on lp.address_key = c.prev_addr left join lines ln on ln.address_key = c.next_addr;
        create or replace table person_years as
        select c.person_key, c.year, b.birth_year, coalesce(s.new_addr, c.filled, c.address_key) as address_key,
               case when s.new_addr is not null then 'stale' when c.filled is not null then 'inferred'
                    when c.address_key is null then 'none'
                    when c.full_address then 'address' else 'postcode' end as address_evidence,
               coalesce(c.n, 0) n,
               -- the same address the year before and after: most errors are around a move
               (c.prev_addr = coalesce(s.new_addr, c.filled, c.address_key))::int
               + (c.next_addr = coalesce(s.new_addr, c.filled, c.address_key))::int as steady
        from py_fill c join person_birth b using (person_key)
        left join (select person_key, year, min(new_addr) new_addr from stale group by all) s using (person_key, year);
        -- integer node ids: the connected-components iterations join on them many times
        create or replace table py_nodes as
        select row_number() over (order by person_key, year) as node_id, * from person_years;
    """


def _edges_sql() -> str:
    return """
        create or replace table claim_py as
        select distinct r.claim_tok, r.year, n.node_id
        from records_linked r join py_nodes n using (person_key, year) where r.claim_tok is not null;
        create or replace table hh_edges as
        -- members of one claim, in the claim's year
        with c as (select a.node_id as l, b.node_id as r
                   from claim_py a join claim_py b on a.claim_tok = b.claim_tok and a.year = b.year and a.node_id < b.node_id),
        -- one address in one year: a chain through the address's members is enough for the components
        f as (select node_id l, lead(node_id) over (partition by address_key, year order by node_id) r
              from py_nodes where address_key is not null)
        select distinct l as node_id_l, r as node_id_r from (select * from c union all select * from f where r is not null);
    """


def _membership_sql() -> str:
    # the membership score of each person-year (see the module docstring)
    return """
        create or replace table households as
        select n.person_key, n.year, n.birth_year, h.household_key, n.address_evidence,
               n.node_id in (select node_id from claim_py) as on_claim, n.n as records_at_address,
               round(1 - exp(-(case when n.node_id in (select node_id from claim_py) then 1.0 else 0 end
                               + case n.address_evidence when 'address' then 1.0 when 'postcode' then 0.7
                                      when 'stale' then 0.5 when 'inferred' then 0.5 else 0 end
                               + 0.3 * least(greatest(n.n - 1, 0), 2) + 1.0 * coalesce(n.steady, 0))), 4) as confidence
        from py_nodes n join hh_keys h using (node_id)
        order by person_key, year;
    """


# a member placed by a postcode alone, or by other years, on one record and no claim
WEAK_MEMBERSHIP = ("(not {m}.on_claim and {m}.address_evidence != 'address' and {m}.records_at_address <= 1)")


# weights of the evidence across years (added to the parent-child score's exponent)
UNIT_WEIGHT = 0.7            # adult and dependant of one benefit unit on different claims
SPELL_WEIGHT = 0.5           # recorded at one address in interleaved years, never in the same year
BIRTH_PARTNER_WEIGHT = 0.7   # the partner of the child's parent in the years just before the birth


def _cross_year_sql(cfg: LinkConfig) -> str:
    """CTEs (after ``j0``, the same-year relations): ``cross``, parent-child evidence across years.

    * **unit**: an adult (claimant or partner) of a benefit unit on one claim and a
      dependant of the same unit on a later claim, the child born by the year after the
      adult's last claim in the unit (the unit is the family; its token is stable across claims);
    * **spell**: the two recorded at one address (as recorded: a stale address still says
      where someone lived) in overlapping spans of years, the elder there before the younger's
      last year, but never placed there in the same year, the younger under ``CHILD_MAX_AGE``
      and the elder an adult then, unless the elder is a young adult and someone there is old
      enough to be the parent of both (an older sibling). Overlap, not succession: a family
      moving into a flat someone left is not evidence, nor is crossing only in the year one
      arrives and the other leaves (one of the two records may be stale);
    * **birth partner**: the child's parent (a same-year relation) lived with an adult of
      about their age (within ``parent_min_age_gap`` years) in the birth year or one of the
      two years before (records are yearly: a partner who left during the pregnancy is
      recorded elsewhere the year before the birth), or in the three years before when the
      adult is not observed anywhere after that until the birth, and nobody else of that age
      lived with the parent in between: the parent's partner at the conception, who left
      before the child was recorded.
    """
    gap = f"{cfg.parent_min_age_gap} and {cfg.parent_max_age_gap}"
    return f""",
        unit as (select a.person_key parent_key, d.person_key child_key
                 from records_linked a join records_linked d
                      on a.benefit_unit_tok = d.benefit_unit_tok and a.year <= d.year and a.person_key != d.person_key
                 join person_birth pa on pa.person_key = a.person_key join person_birth pd on pd.person_key = d.person_key
                 where a.bu_role in ('claimant', 'partner') and d.bu_role = 'dependant'
                   and pd.birth_year - pa.birth_year between {gap}
                 group by all having max(a.year) + 1 >= any_value(pd.birth_year)),
        spell as (select person_key, address_key, min(year) y0, max(year) y1 from pya
                  where address_key is not null group by all),
        spell_pair as (
            select a.person_key parent_key, c.person_key child_key
            -- interleaved: the elder arrived before the younger's last year there (crossing only in
            -- the year one arrives and the other leaves is a move, and one of the two records may be stale)
            from spell a join spell c on a.address_key = c.address_key and a.person_key != c.person_key
                 and a.y0 < c.y1 and c.y0 <= a.y1
            join person_birth pa on pa.person_key = a.person_key join person_birth pc on pc.person_key = c.person_key
            where pc.birth_year - pa.birth_year between {gap}
              and greatest(a.y0, c.y0) - pc.birth_year < {CHILD_MAX_AGE} and least(a.y1, c.y1) - pa.birth_year >= 18
              and not exists (select 1 from py_nodes x join py_nodes y on x.year = y.year and x.address_key = y.address_key
                              where x.person_key = a.person_key and y.person_key = c.person_key
                                and x.address_key = a.address_key)
              and not (greatest(a.y0, c.y0) - pa.birth_year < {CHILD_MAX_AGE} and exists (
                  select 1 from spell g join person_birth pg on pg.person_key = g.person_key
                  where g.address_key = a.address_key and g.y0 <= least(a.y1, c.y1) and greatest(a.y0, c.y0) <= g.y1
                    and pa.birth_year - pg.birth_year between {gap} and pc.birth_year - pg.birth_year between {gap}))
            group by all),
        partner_year as (   -- adults living with a parent, of about the parent's age
            select m.person_key parent_key, x.person_key partner_key, x.year
            from households m join households x on x.household_key = m.household_key and x.year = m.year
                 and x.person_key != m.person_key
            join person_birth mb on mb.person_key = m.person_key join person_birth xb on xb.person_key = x.person_key
            where abs(xb.birth_year - mb.birth_year) < {cfg.parent_min_age_gap} and x.year - xb.birth_year >= 18),
        bp as (select p.parent_key, q.partner_key, p.child_key, cb.birth_year child_birth, max(q.year) last_year
               from j0 p join person_birth cb on cb.person_key = p.child_key
               join partner_year q on q.parent_key = p.parent_key and q.partner_key != p.child_key
                    and q.year between cb.birth_year - 3 and cb.birth_year
               join person_birth xb on xb.person_key = q.partner_key
               where cb.birth_year - xb.birth_year between {gap}
               group by all),
        birth_partner as (
            select partner_key parent_key, child_key from bp b
            where (last_year >= child_birth - 2 or not exists (
                       select 1 from households o where o.person_key = b.partner_key
                          and o.year > b.last_year and o.year <= b.child_birth))
              and not exists (select 1 from partner_year z where z.parent_key = b.parent_key
                                 and z.partner_key != b.partner_key and z.year > b.last_year and z.year <= b.child_birth)
            group by all),
        xyear as (select parent_key, child_key,
                         sum(w) cross_weight from (
                             select *, {UNIT_WEIGHT} w from unit
                             union all select *, {SPELL_WEIGHT} from spell_pair
                             union all select *, {BIRTH_PARTNER_WEIGHT} from birth_partner) group by all)"""


def parent_child_sql(cfg: LinkConfig, weak_membership: bool = False, cross_year: bool = False) -> str:
    """SQL: ``parent_child`` from ``records_linked`` (claims) and ``households``.

    Args:
        cfg: linkage settings (age-gap bounds).
        weak_membership: ``households`` carries ``on_claim``, ``address_evidence`` and
            ``records_at_address`` (as :func:`assemble_households` writes it): a year living
            together where either member is weakly placed counts half.
        cross_year: also count evidence across years (:func:`_cross_year_sql`); needs
            ``py_nodes`` (person_key, year, address_key) and ``records_linked.benefit_unit_tok``.
    """
    gap = f"{cfg.parent_min_age_gap} and {cfg.parent_max_age_gap}"
    weak = (f"{WEAK_MEMBERSHIP.format(m='a')} or {WEAK_MEMBERSHIP.format(m='c')}"
            if weak_membership else "false")
    cross = _cross_year_sql(cfg) if cross_year else """,
        xyear as (select parent_key, child_key, 0.0 cross_weight from j0 where false)"""   # keys typed as the caller's
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
        co_year as (select a.person_key parent_key, c.person_key child_key, a.year,
                           -- a young adult or a weakly placed member is weaker evidence of a parent
                           (case when c.year - c.birth_year >= 18 then 0.6 else 1.0 end)
                           * (case when {weak} then 0.5 else 1.0 end) as strength
                    from households a join households c on a.household_key = c.household_key and a.year = c.year
                    where c.birth_year - a.birth_year between {gap}
                      and a.year - a.birth_year >= 18 and c.year - c.birth_year < {CHILD_MAX_AGE}
                      -- a young adult living with someone old enough to be the parent of both is an
                      -- older sibling, not a parent
                      and not (a.year - a.birth_year < {CHILD_MAX_AGE} and exists (
                          select 1 from households g where g.household_key = a.household_key and g.year = a.year
                             and a.birth_year - g.birth_year between {gap}
                             and c.birth_year - g.birth_year between {gap}))),
        co as (select parent_key, child_key, count(*) coresident_years, sum(strength) coresident_strength
               from co_year group by all),
        j0 as (select parent_key, child_key, coalesce(bu_years, 0) bu_years, coalesce(coresident_years, 0) coresident_years,
                      coalesce(coresident_strength, 0) coresident_strength
               from bu full join co using (parent_key, child_key)){cross},
        j as (select parent_key, child_key, coalesce(j0.bu_years, 0) bu_years,
                     coalesce(j0.coresident_years, 0) coresident_years,
                     coalesce(j0.coresident_strength, 0) coresident_strength,
                     coalesce(x.cross_weight, 0) cross_weight
              from j0 full join xyear x using (parent_key, child_key))
        select j.* exclude (coresident_strength, cross_weight), p.birth_year parent_birth_year, c.birth_year child_birth_year,
               c.birth_year - p.birth_year age_gap,
               round(1 - exp(-(1.0 * bu_years + 0.35 * coresident_strength + cross_weight)), 4) confidence
        from j join person_birth p
                    on p.person_key = j.parent_key
               join person_birth c
                    on c.person_key = j.child_key
        order by parent_key, child_key;
    """


# Every join above relates two people only through a value they share: an address, a benefit unit
# or a claim, and (for a record with no address line) what the full addresses at its postcode say;
# household keys come from components of those joins. So the households and parent-child relations
# of a connected component of the graph of people and their places (:func:`_expand_places`) depend on that
# component's records and those postcodes' address sets alone (:func:`_affected_persons`).


def _expand_places(con: duckdb.DuckDBPyConnection, dice: float = ADDRESS_DICE) -> None:
    """Add to ``_hh_place`` (p, place) the places of every record at the postcodes in
    ``_hh_pc_todo`` (pc), benefit units in ``_hh_unit_todo`` (u) and claims in ``_hh_claim_todo`` (c),
    and leave in ``_hh_dirty`` (p) the persons dirty at those postcodes. Persons, postcodes, units,
    claims and places are 64-bit hashes, as in ``_hh_index`` (:func:`_affected_persons`).

    The places are the values through which the SQL above relates two people:

    * a benefit unit, a claim;
    * an *address group*: address lines at one postcode joined, directly or through others,
      by filters at least ``dice`` alike. Every statement that reads several lines together
      reads one line's neighbours (``addr_canon`` keys a line by the smallest filter within
      ``dice``), so lines of different groups never meet: two households whose postcodes
      collide (a shared or mistyped postcode) are not one place;
    * for a record with no address line (a pupil's), the group of the address it resolves to
      (``pya``: the one full address at its postcode that year, else the one ever there), or,
      unresolved, the postcode's unresolved address (``'P|'``, which such records share).

    A pupil's resolution reads every full address at the postcode: the *address sets*
    (distinct address keys at the postcode in each year, and in all years). These sets
    change only when a record arrives; so pupils at a postcode whose sets may have changed
    since the previous release (a new address line there, or a new address in a year with
    pupils) are *dirty*: changed persons, like those with new records, and such a postcode
    is a place as a whole (a pupil there may have resolved to another group then, or now to
    none). Any other pupil resolves as it did then, so places only grow from release to
    release: a component of unchanged persons is one the previous release had.

    Every place but a unit or claim lies within one postcode and depends only on the records
    there, so the places are built postcode by postcode as the search reaches them, never
    for every record: at 1,000,000 persons building them all took most of a delivery's
    households. A dirty postcode holds a new record, so the first step, from the persons
    with new records, finds every one. Needs ``records_linked``, its index ``_hh_index`` and
    ``_hh_new_rec`` (the tokens of the records the previous release lacked).
    """
    from splink import DuckDBAPI
    from splink.clustering import cluster_pairwise_predictions_at_threshold

    con.execute("""
        create or replace temp table _hh_at as
        select person_key, record_token, year, postcode_tok, addr_bf from records_linked
        where rowid in (select rid from _hh_index semi join _hh_pc_todo using (pc));
        create or replace temp table _hh_dirty (p ubigint);
    """)
    if con.execute("select count(*) from _hh_at").fetchone()[0]:
        # the address keys at these postcodes, as the households SQL builds them (addr_near, addr_canon)
        con.execute(_addresses_sql(dice, "_hh_at"))
        con.execute("""
            create or replace temp table _hh_line_node as
            select distinct postcode_tok || '|' || addr_hex as node from addr_near where addr_hex != near_hex;
            create or replace temp table _hh_line_edge as
            select postcode_tok || '|' || addr_hex as node_l, postcode_tok || '|' || near_hex as node_r
            from addr_near where addr_hex < near_hex;
        """)
        # address groups: the connected components of lines within the dice of each other
        groups = cluster_pairwise_predictions_at_threshold(
            "_hh_line_node", "_hh_line_edge", DuckDBAPI(connection=con), node_id_column_name="node",
            edge_id_column_name_left="node_l", edge_id_column_name_right="node_r")
        con.execute(f"""
            create or replace temp table _hh_line_group as
            select c.postcode_tok, c.addr_hex h, c.canon_hex canon, coalesce(g.cluster_id, c.postcode_tok || '|' || c.addr_hex) grp
            from addr_canon c left join {groups.physical_name} g on g.node = c.postcode_tok || '|' || c.addr_hex;
            create or replace temp table _hh_at_new as
            select *, record_token in (select record_token from _hh_new_rec) new from _hh_at;
            create or replace temp table _hh_new_line as
            select postcode_tok, hex(addr_bf) h from _hh_at_new where new and addr_bf is not null
            except
            select postcode_tok, hex(addr_bf) from _hh_at_new where not new and addr_bf is not null;
            create or replace temp table _hh_pupil as
            select distinct postcode_tok, year from _hh_at where addr_bf is null;
            create or replace temp table _hh_pupil_pc as select distinct postcode_tok from _hh_pupil;
            -- the address sets at postcodes with pupils: each address key, the years it is at the
            -- postcode, and whether it was there in that year in the previous release
            create or replace temp table _hh_kset as
            select r.postcode_tok, r.year, l.canon, l.grp, bool_or(not r.new) as before
            from _hh_at_new r join _hh_line_group l on l.postcode_tok = r.postcode_tok and l.h = hex(r.addr_bf)
            where r.addr_bf is not null and r.postcode_tok in (select postcode_tok from _hh_pupil_pc)
            group by r.postcode_tok, r.year, l.canon, l.grp;
            create or replace temp table _hh_resolve as
            with y as (select postcode_tok, year, count(distinct canon) n, min(grp) grp from _hh_kset
                       group by postcode_tok, year),
                 e as (select postcode_tok, count(distinct canon) n, min(grp) grp from _hh_kset group by postcode_tok)
            select p.postcode_tok, p.year,
                   case when y.n = 1 then '3:' || y.grp
                        when y.n is null and e.n = 1 then '3:' || e.grp
                        else '4:' || p.postcode_tok end as place
            from _hh_pupil p
            left join y using (postcode_tok, year) left join e using (postcode_tok);
            -- dirty: a new line at the postcode (address keys may move), or a new address in a year with pupils
            create or replace temp table _hh_dirty_pc as
            select postcode_tok from _hh_new_line where postcode_tok in (select postcode_tok from _hh_pupil_pc)
            union
            select k.postcode_tok from _hh_kset k semi join _hh_pupil p using (postcode_tok, year)
            group by k.postcode_tok, k.year, k.canon having not bool_or(k.before);
            insert into _hh_dirty
            select distinct hash(person_key) from _hh_at
            where addr_bf is null and postcode_tok in (select postcode_tok from _hh_dirty_pc);
            insert into _hh_place
            select distinct hash(person_key), hash(place) from (
                select r.person_key, '3:' || l.grp as place
                from _hh_at r join _hh_line_group l on l.postcode_tok = r.postcode_tok and l.h = hex(r.addr_bf)
                where r.addr_bf is not null
                union all
                select r.person_key, x.place from _hh_at r join _hh_resolve x using (postcode_tok, year)
                where r.addr_bf is null
                union all
                -- a dirty postcode as a whole: a pupil there may resolve elsewhere than it did (moving
                -- between the groups there, or to none), so the groups it did and does resolve to meet
                select person_key, '0:' || postcode_tok from _hh_at
                where postcode_tok in (select postcode_tok from _hh_dirty_pc));
            drop table _hh_line_node; drop table _hh_line_edge; drop table _hh_line_group; drop table _hh_new_line;
            drop table _hh_pupil; drop table _hh_pupil_pc; drop table _hh_kset; drop table _hh_resolve;
            drop table _hh_dirty_pc; drop table _hh_at_new; drop table addr_full; drop table addr_near;
            drop table addr_canon;
        """)
        con.execute(f"drop table if exists {groups.physical_name}")
    con.execute("""
        insert into _hh_place
        select distinct p, hash(1, u) from _hh_index semi join _hh_unit_todo using (u)
        union
        select distinct p, hash(2, c) from _hh_index semi join _hh_claim_todo using (c);
        drop table _hh_at;
    """)


def households_fingerprint(cfg: LinkConfig) -> str:
    """A digest of everything that decides households from records: the SQL itself, with its
    constants and ``cfg``'s age gaps. A release whose previous one had another fingerprint
    recomputes every household."""
    sql = _person_years_sql() + _edges_sql() + _membership_sql() + parent_child_sql(cfg, True, True)
    return hashlib.sha256(sql.encode()).hexdigest()[:16]


def _affected_persons(con: duckdb.DuckDBPyConnection, cfg: LinkConfig, previous: Path | None,
                      fingerprint: str, parts: dict, arrived: str | None = None,
                      persons: str | None = None) -> tuple[int | None, str]:
    """The persons whose households may differ from the previous release's, as ``_hh_affected``.

    A person is *changed* when one of its records is new or moved from or to another person
    key since ``previous`` (both keys count, so merged and split persons do). The affected
    persons are the connected components, in the graph of persons and the places they have
    records at (:func:`_expand_places`), of the changed ones. Any other person's component holds only
    unchanged persons with unchanged records, as it did in the previous release (a person
    who had shared a place with it then still does, under the same key), so its households
    and relations are the previous release's, exactly. Returns (affected persons, reason),
    or (None, reason) when every household must be recomputed. With affected persons it also
    leaves ``_hh_index`` (each record's row id and the hashes of its person key, postcode, unit and
    claim), from which :func:`assemble_households` selects their records.
    """
    if previous is None:
        return None, "full: no previous release"
    if not cfg.incremental:
        return None, "full: link.incremental is false"
    files = {n: Path(previous) / n for n in ("identities.parquet", "households.parquet", "parent_child.parquet",
                                              "summary.json")}
    if not all(f.is_file() for f in files.values()) or (arrived is None and not record_files(previous)):
        return None, "full: no previous release to build on"
    try:
        before = json.loads(files["summary.json"].read_text()).get("households_fingerprint")
    except (OSError, ValueError):
        return None, "full: the previous release's summary is unreadable"
    if before != fingerprint:
        return None, "full: the households' settings or code differ from the previous release's"
    t = time.perf_counter()
    if arrived is None:
        con.execute(f"""
            create or replace temp table _hh_prev as
            select record_token, person_key from {records_relation(previous)};
        """)
        gone = con.execute("select count(*) from _hh_prev anti join records_linked using (record_token)").fetchone()[0]
        if gone:
            con.execute("drop table _hh_prev")
            # the places assume records only arrive: an address set may have lost one
            return None, f"full: {gone:,} records of the previous release are gone"
        con.execute("""
            create or replace temp table _hh_new_rec as
            select record_token from records_linked anti join _hh_prev using (record_token);
            create or replace temp table _hh_frontier as
            select distinct r.person_key from records_linked r left join _hh_prev p using (record_token)
            where p.person_key is distinct from r.person_key
            union
            select p.person_key from _hh_prev p join records_linked r using (record_token)
            where r.person_key != p.person_key;
            drop table _hh_prev;""")
    else:
        # the records are the previous release's and ``arrived``: a record moved from or to another
        # person key exactly when its identity did (an identity's records share one), so the
        # identities say it without reading every record of the previous release
        ids = files["identities.parquet"]
        now = persons or "(select unique_id, any_value(person_key) person_key from records_linked group by unique_id)"
        con.execute(f"""
            create or replace temp table _hh_new_rec as select record_token from {arrived};
            create or replace temp table _hh_frontier as
            select distinct person_key from records_linked semi join _hh_new_rec using (record_token)
            union
            select unnest([p.person_key, n.person_key]) from read_parquet({read_literal(ids)}) p
            join {now} n using (unique_id)
            where p.person_key != n.person_key""")
    # the search runs on 64-bit hashes of person keys, postcodes, units, claims and places, over a narrow
    # index of every record (each step scanned the records' tokens three times: 7 of the 13 s of the
    # search at 1,000,000 persons). Two values sharing a hash are one node: the search then reaches
    # both, whose components it follows whole, so it may recompute more persons, never fewer.
    con.execute("""
        create or replace temp table _hh_index as
        select rowid rid, hash(person_key) p, case when postcode_tok is not null then hash(postcode_tok) end pc,
               case when benefit_unit_tok is not null then hash(benefit_unit_tok) end u,
               case when claim_tok is not null then hash(claim_tok) end c
        from records_linked;
        alter table _hh_frontier rename to _hh_changed;
        create or replace temp table _hh_frontier as select distinct hash(person_key) p from _hh_changed;
        create or replace temp table _hh_reached as select p from _hh_frontier;
        create or replace temp table _hh_place (p ubigint, place ubigint);
        create or replace temp table _hh_pc_done (pc ubigint);
        create or replace temp table _hh_unit_done (u ubigint);
        create or replace temp table _hh_claim_done (c ubigint);
    """)
    parts["changed"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    everyone = con.execute(f"select count(distinct person_key) from {persons or 'records_linked'}").fetchone()[0]
    affected = con.execute("select count(*) from _hh_reached").fetchone()[0]
    steps = 0
    # breadth first, building the places of what each step reaches (_expand_places); stop as soon as
    # the reach passes the bound (at 1,000,000 persons it once reached 594,074 persons before falling back)
    while not everyone or affected / everyone <= cfg.incremental_max_share:
        steps += 1
        con.execute("""
            create or replace temp table _hh_fr_rec as
            select pc, u, c from _hh_index semi join _hh_frontier using (p);
            create or replace temp table _hh_pc_todo as
            select distinct pc from _hh_fr_rec where pc is not null except select pc from _hh_pc_done;
            create or replace temp table _hh_unit_todo as
            select distinct u from _hh_fr_rec where u is not null except select u from _hh_unit_done;
            create or replace temp table _hh_claim_todo as
            select distinct c from _hh_fr_rec where c is not null except select c from _hh_claim_done;
            insert into _hh_pc_done select * from _hh_pc_todo;
            insert into _hh_unit_done select * from _hh_unit_todo;
            insert into _hh_claim_done select * from _hh_claim_todo;
            drop table _hh_fr_rec;
        """)
        _expand_places(con)
        # the persons sharing a place with the frontier, and those dirty at the postcodes just built
        con.execute("""create or replace temp table _hh_next as
                       select p from (
                           select b.p from _hh_place a semi join _hh_frontier using (p) join _hh_place b using (place)
                           union select p from _hh_dirty)
                       anti join _hh_reached using (p);
                       drop table _hh_dirty; drop table _hh_pc_todo; drop table _hh_unit_todo; drop table _hh_claim_todo""")
        reached = con.execute("select count(*) from _hh_next").fetchone()[0]
        if not reached:
            break
        affected += reached
        con.execute("insert into _hh_reached select p from _hh_next; "
                    "drop table _hh_frontier; alter table _hh_next rename to _hh_frontier")
    con.execute("drop table if exists _hh_next; drop table _hh_frontier; drop table _hh_place; drop table _hh_new_rec; "
                "drop table _hh_pc_done; drop table _hh_unit_done; drop table _hh_claim_done")
    parts["reach"], parts["reach_steps"] = round(time.perf_counter() - t, 1), steps
    if everyone and affected / everyone > cfg.incremental_max_share:
        con.execute("drop table _hh_reached; drop table _hh_changed; drop table _hh_index")
        return None, (f"full: at least {affected:,} of {everyone:,} persons reached by changed records "
                      f"(more than link.incremental_max_share = {cfg.incremental_max_share})")
    # the persons the search reached: every person key whose hash it reached, and the changed ones
    # (a key the previous release had and this one lacks, its rows to go)
    con.execute(f"""create or replace temp table _hh_affected as
                    select person_key from {persons or 'records_linked'} where hash(person_key) in (select p from _hh_reached)
                    union select person_key from _hh_changed;
                    drop table _hh_reached; drop table _hh_changed""")
    affected = con.execute("select count(*) from _hh_affected").fetchone()[0]
    return affected, f"incremental: {affected:,} of {everyone:,} persons recomputed"


def _compute(con: duckdb.DuckDBPyConnection, cfg: LinkConfig) -> None:
    from splink import DuckDBAPI
    from splink.clustering import cluster_pairwise_predictions_at_threshold

    con.execute(_person_years_sql())
    con.execute(_edges_sql())
    clusters = cluster_pairwise_predictions_at_threshold(
        "py_nodes", "hh_edges", DuckDBAPI(connection=con), node_id_column_name="node_id")
    con.execute(f"""
        create or replace table hh_keys as
        select n.node_id, 'H' || left(md5(min(n.person_key) over (partition by c.cluster_id)), 16) as household_key
        from py_nodes n join {clusters.physical_name} c using (node_id)""")
    con.execute(_membership_sql())
    con.execute(parent_child_sql(cfg, weak_membership=True, cross_year=True))


def assemble_households(con: duckdb.DuckDBPyConnection, cfg: LinkConfig, previous: Path | None = None,
                        arrived: str | None = None, persons: str | None = None, consume: bool = False) -> dict:
    """Build ``households`` and ``parent_child`` on ``con``.

    ``households``: person_key, year, birth_year, household_key, address_evidence
    (address, postcode, stale, inferred or none), on_claim, records_at_address and the
    membership confidence; one row per observed person-year.

    With ``previous`` (the previous release's ``linked/``), only the persons a changed
    record reaches are recomputed (:func:`_affected_persons`) and everyone else's rows are
    the previous release's: the same tables a full computation gives, except that a
    household's ``household_key`` is then only a name for it, the previous release's key for
    a carried household and ``'N'`` + its computed key for a recomputed one, until
    :func:`linkage.link.stable_keys.household_keys` gives every household its key (which
    depends only on the households' members, so the keys are a full computation's too).

    Args:
        con: a DuckDB connection holding ``records_linked`` (record token, person_key, year,
            birth_year, claim_tok, bu_role, postcode_tok, addr_bf, benefit_unit_tok).
        cfg: linkage settings (age-gap bounds for parents; ``incremental``, ``incremental_max_share``).
        previous: the previous release's ``linked/`` folder, or None.
        arrived: a table of the record tokens (``record_token``) that ``previous`` lacks, when the
            caller knows that ``records_linked`` holds exactly ``previous``' records and those (the
            link state's new records); None: ``previous``' records are read to find out.
        persons: with ``arrived``, a table of this release's identities and their person keys
            (unique_id, person_key); None: taken from ``records_linked``.
        consume: drop ``records_linked`` once the reached persons' records are taken from it,
            incrementally (the link stage needs it no further: at 1,000,000 persons its 18.7
            million records held most of DuckDB's memory, and the merge's sort took 5.7 s beside
            them, 2.7 s without); False: leave it as it was.

    Returns:
        Counts of household-years, households' mean size, parent-child relations, the
        person-years by address evidence (``address_evidence``), ``households_mode`` (why
        full or incremental), ``households_recomputed_persons``, ``households_fingerprint`` and
        ``households_parts`` (seconds by part: changed persons, reach and its breadth-first steps,
        select (the reached persons' records and their context), compute, merge with the previous
        release's rows, counts).

    Example:
        >>> assemble_households(con, load_config().link)["household_years"]   # doctest: +SKIP
    """
    fingerprint = households_fingerprint(cfg)
    parts: dict = {}
    affected, mode = _affected_persons(con, cfg, previous, fingerprint, parts, arrived, persons)
    t = time.perf_counter()
    totals = None
    if affected is None:
        _compute(con, cfg)
        recomputed = con.execute("select count(distinct person_key) from records_linked").fetchone()[0]
    else:
        households, relations = (read_literal(Path(previous) / f) for f in ("households.parquet", "parent_child.parquet"))
        # with the affected persons' records, the full addresses of everyone else at the postcodes of
        # their records without an address line: the address sets those resolve by (_expand_places). Those
        # context rows meet the affected persons nowhere else (other address groups; no claim, no
        # unit), and their own rows are dropped below.
        # in three statements: as one (a union with the postcodes as a subquery) DuckDB took 9.6 s at
        # 1,000,000 persons, against 2.6 s for its parts
        # the rows found by the search's index (_hh_index: row, person and postcode hashes), the
        # keys then compared: 2.3 s against 3.8 s at 1,000,000 persons for three scans of every record
        con.execute("""alter table records_linked rename to _hh_records_all;
                       create or replace temp table _hh_rows as
                       select rid from _hh_index where p in (select hash(person_key) from _hh_affected);
                       create table records_linked as
                       select * from (select * from _hh_records_all where rowid in (select rid from _hh_rows))
                       semi join _hh_affected using (person_key);
                       create or replace temp table _hh_context_pc as
                       select distinct postcode_tok from records_linked where addr_bf is null and postcode_tok is not null;
                       insert into records_linked
                       select * replace (null as benefit_unit_tok, null as bu_role, null as claim_tok)
                       from (select * from _hh_records_all where rowid in (
                                 select rid from _hh_index
                                 where pc in (select hash(postcode_tok) from _hh_context_pc)
                                 except select rid from _hh_rows)) r
                       anti join _hh_affected using (person_key)
                       where r.addr_bf is not null and r.postcode_tok in (select postcode_tok from _hh_context_pc);
                       drop table _hh_context_pc; drop table _hh_rows; drop table _hh_index""")
        if consume:
            con.execute("drop table _hh_records_all")
        try:
            recomputed = con.execute("select count(distinct person_key) from records_linked "
                                     "semi join _hh_affected using (person_key)").fetchone()[0]
            parts["select"] = round(time.perf_counter() - t, 1)
            if recomputed:
                _compute(con, cfg)
                con.execute("""delete from households where person_key not in (select person_key from _hh_affected);
                               delete from parent_child where parent_key not in (select person_key from _hh_affected)
                                   or child_key not in (select person_key from _hh_affected)""")
            else:   # nothing changed: the previous tables as they are
                con.execute(f"""create or replace table households as select * from read_parquet({households}) where false;
                                create or replace table parent_child as select * from read_parquet({relations}) where false""")
        finally:
            con.execute("drop table if exists records_linked" if consume else
                        "drop table if exists records_linked; alter table _hh_records_all rename to records_linked")
        parts["compute"] = round(time.perf_counter() - t - parts["select"], 1)
        t = time.perf_counter()
        # the counts move by the recomputed rows' less the rows they replace (a household lies wholly
        # among one or the other), so they need no pass over every household
        try:
            before = json.loads((Path(previous) / "summary.json").read_text())
            totals = {k: before[k] for k in ("household_years", "parent_child_relations", "address_evidence")}
        except (OSError, ValueError, KeyError):
            totals = None
        if totals is not None:
            added = _counts(con, "households", "parent_child")
            removed = _counts(con, f"(select * from read_parquet({households}) semi join _hh_affected using (person_key))",
                              f"""(select * from read_parquet({relations})
                                   where parent_key in (select person_key from _hh_affected)
                                      or child_key in (select person_key from _hh_affected))""")
            totals = {k: totals[k] - removed[k] + added[k] for k in ("household_years", "parent_child_relations")} | {
                "address_evidence": {e: n for e in sorted({*totals["address_evidence"], *added["address_evidence"]})
                                     if (n := totals["address_evidence"].get(e, 0) - removed["address_evidence"].get(e, 0)
                                         + added["address_evidence"].get(e, 0))}}
        con.execute(f"""
            create or replace table households as
            select * from (select * replace ('N' || household_key as household_key) from households
                           union all by name
                           select * from read_parquet({households}) anti join _hh_affected using (person_key))
            order by person_key, year;
            create or replace table parent_child as
            select * from (select * from parent_child
                           union all by name
                           select * from read_parquet({relations})
                           where parent_key not in (select person_key from _hh_affected)
                             and child_key not in (select person_key from _hh_affected))
            order by parent_key, child_key;
            drop table _hh_affected;
        """)
        parts["merge"] = round(time.perf_counter() - t, 1)
    if "compute" not in parts:
        parts["compute"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    if totals is None:
        totals = _counts(con, "households", "parent_child")
    parts["counts"] = round(time.perf_counter() - t, 1)
    hh, evidence = totals["household_years"], totals["address_evidence"]
    return {"household_years": hh, "mean_household_size": round(sum(evidence.values()) / hh if hh else 0, 3),
            "parent_child_relations": totals["parent_child_relations"], "address_evidence": evidence,
            "households_mode": mode, "households_recomputed_persons": int(recomputed),
            "households_fingerprint": fingerprint, "households_parts": parts}


def _counts(con: duckdb.DuckDBPyConnection, households: str, relations: str) -> dict:
    """Household-years, parent-child relations and person-years by address evidence of the tables or queries given."""
    hh, pc = con.execute(f"""select (select count(distinct (household_key, year)) from {households}),
                                    (select count(*) from {relations})""").fetchall()[0]
    evidence = dict(con.execute(f"select address_evidence, count(*) from {households} group by 1 order by 1").fetchall())
    return {"household_years": hh, "parent_child_relations": pc, "address_evidence": evidence}


CONFIDENCE_BANDS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def band_sql(column: str) -> str:
    """SQL: the :data:`CONFIDENCE_BANDS` label (``'0.70-0.80'``) of ``column``."""
    edges = list(CONFIDENCE_BANDS)
    cases = " ".join(f"when {column} >= {lo} then '{lo:.2f}-{hi:.2f}'"
                     for lo, hi in reversed(list(zip(edges, [*edges[1:], 1.0]))))
    return f"case {cases} end"


def confidence_distribution_sql(table: str, unit: str) -> str:
    """SQL: rows of (band, ``unit`` count, share) of ``table``'s ``confidence`` in :data:`CONFIDENCE_BANDS`.

    Example:
        >>> con.execute(confidence_distribution_sql("households", "person_years")).fetchall()   # doctest: +SKIP
    """
    return f"""
        select band, count(*) as {unit}, round(count(*) / sum(count(*)) over (), 4) as share
        from (select {band_sql("confidence")} as band from {table}) group by band order by band
    """


def confidence_distributions(con: duckdb.DuckDBPyConnection, linked) -> dict:
    """Household-membership and parent-child confidence distributions from ``linked/`` (aggregates only)."""
    from linkage.db import read_literal

    out = {}
    for key, name, unit in (("household_membership", "households.parquet", "person_years"),
                            ("parent_child", "parent_child.parquet", "relations")):
        path = linked / name
        cols = con.execute(f"describe select * from {read_literal(path)}").fetchall() if path.exists() else []
        if any(c[0] == "confidence" for c in cols):
            cur = con.execute(confidence_distribution_sql(read_literal(path), unit))
            names = [d[0] for d in cur.description]
            out[key] = [dict(zip(names, r)) for r in cur.fetchall()]
    return out
