"""SQL builders for the research tables (``linkage.assemble.stage`` runs them on one DuckDB connection).

Every builder reads tables by name and creates one ``t_*`` table keyed by the linkage's
internal person and household keys (``linkage.assemble.stage`` swaps those for project keys when
it writes ``research/``). Persons are sets of identities (``unique_id``: records equal on
every identifier encoding), so the inputs are kept per identity and a change of links is
a change of the small ``id_person`` map. The inputs:

* fixed for a run: ``recs`` (record_token, unique_id, source, year, birth_year, claim_tok,
  bu_role); per identity ``id_birth`` (unique_id, birth_year, n), ``id_span`` (unique_id,
  first_year, last_year, in_education, in_benefits, in_earnings), ``id_years`` (unique_id,
  year, n), ``id_pay`` (unique_id, year, employer_tok, pay; distinct), ``unique_sex``
  (unique_id, sex); the payloads ``p_edu`` and ``p_ben`` (with unique_id); ``la_region``
  (la_code, region_code) and ``data_window`` (y0, y1);
* the links, which the sensitivity analysis swaps: ``id_person`` (unique_id, person_key),
  ``households`` (person_key, year, birth_year, household_key) and ``parent_child``
  (parent_key, child_key, confidence, bu_years, coresident_years, age_gap).

Reproducibility: most-common values are taken as ``max({'n': count, 'v': value}).v`` so
that ties break the same way on every run (DuckDB's ``mode`` breaks them in thread order);
pay is summed as DECIMAL (pence, exact) and durations as whole days, so sums do not
depend on the order threads add them in; the one mean of fractions is an ordered aggregate.
"""

from __future__ import annotations

from linkage.db import quote_literal

INCOME_BENEFITS = ("UC", "JSA", "ESA", "IS")
_IB = "(" + ", ".join(map(quote_literal, INCOME_BENEFITS)) + ")"


def inputs_sql() -> str:
    """The per-identity inputs and typed payloads, from ``recs`` and ``payload_<source>`` (record token + attributes)."""
    return """
        create or replace table id_birth as
        select unique_id, birth_year, count(*) n from recs where birth_year is not null group by all;
        create or replace table id_span as
        select unique_id, min(year) first_year, max(year) last_year, bool_or(source = 'education') in_education,
               bool_or(source = 'benefits') in_benefits, bool_or(source = 'earnings') in_earnings, count(*) n
        from recs group by 1;
        create or replace table id_years as select unique_id, year, count(*) n from recs group by all;
        create or replace table id_base as select distinct unique_id, base_key from recs;
        create or replace table p_edu as
        select r.unique_id, r.year, e.ethnicity, e.la_code, e.year_group::int year_group, e.fsm::int fsm, e.sen,
               e.ks2_score::int ks2_score, e.ks4_att8::double ks4_att8
        from payload_education e join recs r using (record_token);
        create or replace table p_ben as
        select r.unique_id, b.claim_tok, b.role, b.benefit_type, b.start_date::date start_date, b.end_date::date end_date
        from payload_benefits b join recs r using (record_token);
        -- a row delivered twice (same employer, same pay) counts once
        create or replace table id_pay as
        select distinct r.unique_id, r.year, e.employer_tok, e.pay::decimal(18, 2) pay
        from payload_earnings e join recs r using (record_token) where e.pay is not null;
        create or replace table data_window as select min(year) y0, max(year) y1 from recs;
    """


def person_sql(full: bool = True) -> str:
    """``t_person``: year of birth (and with ``full``: sex, ethnicity, years observed, sources), per person."""
    yob = """
        with yob as (select person_key, max({'n': n, 'v': -birth_year}).v * -1 as birth_year
                     from (select ip.person_key, b.birth_year, sum(b.n) n from id_birth b join id_person ip using (unique_id)
                           group by all) group by 1)"""
    if not full:
        return f"create or replace table t_person as {yob} select * from yob"
    return f"""
        create or replace table t_person as {yob},
        sx as (select person_key, max({{'n': n, 'v': sex}}).v as sex
               from (select ip.person_key, s.sex, sum(sp.n) n from unique_sex s join id_person ip using (unique_id)
                     join id_span sp using (unique_id) where s.sex is not null group by all) group by 1),
        eth as (select person_key, max({{'n': n, 'v': ethnicity}}).v as ethnicity
                from (select ip.person_key, e.ethnicity, count(*) n from p_edu e join id_person ip using (unique_id)
                      where e.ethnicity is not null group by all) group by 1),
        base as (select ip.person_key, min(first_year) first_year, max(last_year) last_year,
                        bool_or(in_education) in_education, bool_or(in_benefits) in_benefits,
                        bool_or(in_earnings) in_earnings
                 from id_span join id_person ip using (unique_id) group by 1)
        select base.person_key, yob.birth_year, sx.sex, eth.ethnicity, base.* exclude (person_key)
        from base join yob using (person_key) left join sx using (person_key) left join eth using (person_key)
    """


def education_sql() -> str:
    """``t_edu``: one row per pupil-year (a row delivered twice counts once) and ``t_la_fsm``, FSM rates per LA-year."""
    return """
        create or replace table t_edu as
        select rp.person_key, e.year, min(e.year_group) year_group, min(e.la_code) la_code,
               max(e.fsm) = 1 as fsm, min(e.sen) sen, max(e.ks2_score) ks2_score, max(e.ks4_att8) ks4_att8
        from p_edu e join id_person rp using (unique_id) group by all;
        create or replace table t_la_fsm as
        select la_code, year, avg(fsm::int) fsm_rate from t_edu where la_code is not null group by all;
    """


def pay_sql() -> str:
    """``t_pay``: PAYE pay and employments per person and tax year; a row delivered twice counts once."""
    return """
        create or replace table t_pay as
        select person_key, year, sum(pay) paye_pay, count(distinct employer_tok) employments
        from (select distinct ip.person_key, e.year, e.employer_tok, e.pay
              from id_pay e join id_person ip using (unique_id))
        group by all
    """


def claims_sql() -> str:
    """``t_claim`` (per person and claim), ``t_claim_year`` (months in each year) and ``t_pben`` (per person-year)."""
    return f"""
        create or replace table t_claim as
        select rp.person_key, b.claim_tok, min(b.benefit_type) benefit_type, min(b.role) role,
               min(b.start_date) start_date,
               coalesce(max(coalesce(b.end_date, make_date(w.y1, 12, 31))), make_date(w.y1, 12, 31)) stop
        from p_ben b join id_person rp using (unique_id), data_window w
        where b.start_date is not null and b.claim_tok is not null
        group by rp.person_key, b.claim_tok, w.y1;
        create or replace table t_claim_year as
        with e as (select c.*, unnest(range(greatest(year(c.start_date), w.y0), least(year(c.stop), w.y1) + 1)) as year
                   from t_claim c, data_window w where c.stop >= c.start_date)
        select person_key, claim_tok, benefit_type, role, year,
               datediff('day', greatest(start_date, make_date(year, 1, 1)), least(stop, make_date(year, 12, 31))) + 1
                   as days,
               datediff('day', make_date(year, 1, 1), make_date(year, 12, 31)) + 1 as year_days
        from e;
        create or replace table t_pben as
        select person_key, year,
               least(12, coalesce(sum(days) filter (where benefit_type in {_IB}), 0) * 12.0 / any_value(year_days))
                   income_benefit_months,
               least(12, coalesce(sum(days) filter (where benefit_type = 'CB'), 0) * 12.0 / any_value(year_days))
                   child_benefit_months,
               array_to_string(list_sort(list(distinct benefit_type)), ',') benefits
        from t_claim_year group by all;
    """


def person_year_sql() -> str:
    """``t_person_year``: every year with a record of the person or a claim in payment, with its attributes."""
    return """
        create or replace table t_person_year as
        with keys as (select distinct ip.person_key, y.year from id_years y join id_person ip using (unique_id)
                      union select person_key, year from t_pben)
        select k.person_key, k.year, k.year - p.birth_year age, h.household_key,
               case when e.year_group is null then null when e.year_group <= 6 then 'primary' else 'secondary' end
                   education_stage,
               e.year_group, e.la_code school_la_code, e.fsm, e.sen, e.ks2_score, e.ks4_att8,
               b.benefits, coalesce(b.income_benefit_months, 0) income_benefit_months,
               coalesce(b.child_benefit_months, 0) child_benefit_months,
               coalesce(y.paye_pay, 0) paye_pay, coalesce(y.employments, 0) employments,
               coalesce(y.paye_pay, 0) > 0 employed
        from keys k join t_person p using (person_key)
        left join households h using (person_key, year)
        left join t_edu e using (person_key, year)
        left join t_pben b using (person_key, year)
        left join t_pay y using (person_key, year)
    """


def household_year_sql() -> str:
    """``t_household_year``: members, composition, LA, PAYE income, OECD-equivalised income, benefits, FSM."""
    return """
        create or replace table t_household_year as
        with m as (select h.household_key, h.year, py.*
                   from households h join t_person_year py using (person_key, year)),
        la as (select household_key, year, max({'n': n, 'v': school_la_code}).v la_code
               from (select household_key, year, school_la_code, count(*) n from m
                     where school_la_code is not null group by all) group by all),
        agg as (select household_key, year, count(*) members,
                       count(*) filter (where age >= 18) adults, count(*) filter (where age < 18) children,
                       count(*) filter (where age >= 14) n14, count(*) filter (where age < 14) nu14,
                       sum(paye_pay) paye_income, max(income_benefit_months) income_benefit_months,
                       max(child_benefit_months) child_benefit_months, bool_or(fsm) fsm
                from m group by all)
        select *, paye_income / oecd_scale equivalised_income from (
        select a.household_key, a.year, a.members, a.adults, a.children,
               case when a.adults = 1 and a.children = 0 then 'one adult'
                    when a.adults = 2 and a.children = 0 then 'two adults'
                    when a.adults = 1 then 'one adult with children'
                    when a.adults = 2 then 'two adults with children' else 'other' end composition,
               la.la_code, r.region_code, a.paye_income,
               -- OECD modified scale: the first member 1, others 0.5 from age 14, 0.3 under 14
               case when a.n14 >= 1 then 1.0 + 0.5 * (a.n14 - 1) + 0.3 * a.nu14 else 1.0 + 0.3 * (a.nu14 - 1) end::double
                   oecd_scale,
               a.income_benefit_months, a.child_benefit_months, a.fsm
        from agg a left join la using (household_key, year) left join la_region r using (la_code))
    """


def mobility_cohorts_sql(childhood: tuple[int, int], adult: tuple[int, int], alias: str = "p") -> str:
    """Condition on ``{alias}.birth_year`` (and ``w``, the data window): cohorts with a childhood and an adult year in the data.

    Only they can have both parental earnings and adult pay, so the headline measures need no other.
    """
    (c0, c1), (a0, a1) = childhood, adult
    return (f"{alias}.birth_year between greatest(w.y0 - {c1}, w.y0 - {a1}) "
            f"and least(w.y1 - {c0}, w.y1 - {a0})")


def coresidence_sql(min_confidence: float, cohorts: str | None = None) -> str:
    """``t_status``: whether each parent lived with the child, per year of the child's childhood (0-17).

    Observed where both are linked into households that year (the child's with someone in
    it): together or apart. Between the first and last year seen together the parent counts
    as living with the child (a year apart inside that span is an address slip, e.g. a stale
    address after a move); other years take the nearest observed status (the earlier on a tie).
    ``cohorts``: a condition on the child's birth year (``c.birth_year``) limiting the children.
    """
    keep = f"where {cohorts}" if cohorts else ""
    return f"""
        create or replace table t_status as
        with rel as (select parent_key, child_key from parent_child where confidence >= {min_confidence!r}),
        size as (select household_key, year, count(*) n from households group by all),
        yrs as (select r.parent_key, r.child_key,
                       unnest(range(greatest(w.y0, c.birth_year), least(w.y1, c.birth_year + 17) + 1)) as year
                from rel r join t_person c on c.person_key = r.child_key, data_window w {keep}),
        obs as (select y.parent_key, y.child_key, y.year,
                       case when hp.household_key is null or hc.household_key is null then null
                            when hp.household_key = hc.household_key then 1 else 0 end as seen
                from yrs y
                left join households hp on hp.person_key = y.parent_key and hp.year = y.year
                left join (select h.* from households h join size s using (household_key, year) where s.n >= 2) hc
                     on hc.person_key = y.child_key and hc.year = y.year),
        filled as (
            select *,
                   last_value(case when seen is not null then year end ignore nulls) over before prev_year,
                   last_value(seen ignore nulls) over before prev_seen,
                   first_value(case when seen is not null then year end ignore nulls) over after next_year,
                   first_value(seen ignore nulls) over after next_seen,
                   min(case when seen = 1 then year end) over pair first_with,
                   max(case when seen = 1 then year end) over pair last_with
            from obs
            window pair as (partition by parent_key, child_key),
                   before as (partition by parent_key, child_key order by year
                              rows between unbounded preceding and current row),
                   after as (partition by parent_key, child_key order by year
                             rows between current row and unbounded following))
        select parent_key, child_key, year, seen,
               case when year between first_with and last_with then 1
                    when seen is not null then seen
                    when prev_year is null then next_seen
                    when next_year is null or year - prev_year <= next_year - year then prev_seen
                    else next_seen end = 1 as lived_with
        from filled
    """


def childhood_sql(ages: tuple[int, int], with_income: bool = True) -> str:
    """``t_childhood``: per child, parental PAYE earnings (and equivalised household income) over the age window.

    A year of the window counts when the child lived with at least one linked parent; the
    parents' pay is summed (no PAYE record: 0). Household income divides it by the OECD
    scale of the child's household that year, or, where the child was not linked into a
    household with others, of the parents and the child.
    """
    a0, a1 = ages
    income = """,
               parental_pay / case when hy.oecd_scale is not null and hy.members >= 2 then hy.oecd_scale
                                   else 1 + 0.5 * (parents_with - 1) + case when age >= 14 then 0.5 else 0.3 end
                              end as equivalised""" if with_income else ""
    hy_join = """left join households h on h.person_key = cy.child_key and h.year = cy.year
               left join t_household_year hy on hy.household_key = h.household_key and hy.year = cy.year""" \
        if with_income else ""
    avg_income = ", avg(equivalised order by year) household_income" if with_income else ""
    return f"""
        create or replace table t_childhood as
        with cy as (select s.child_key, s.year, s.year - c.birth_year age,
                           sum(coalesce(p.paye_pay, 0)) parental_pay, count(*) parents_with
                    from t_status s join t_person c on c.person_key = s.child_key
                    left join t_pay p on p.person_key = s.parent_key and p.year = s.year
                    where s.lived_with and s.year - c.birth_year between {a0} and {a1}
                    group by all),
        e as (select cy.*{income} from cy {hy_join})
        select child_key, count(*) childhood_years, avg(parental_pay) parents_earnings{avg_income}
        from e group by 1
    """


def _percentile(col: str) -> str:
    """Mid-rank percentile (0-100) of ``col`` within birth cohort; NULL stays NULL."""
    part = f"partition by birth_year, {col} is null"
    return f"""case when {col} is null then null else
               100.0 * (rank() over (partition by birth_year, {col} is null order by {col})
                        + (count(*) over (partition by birth_year, {col}) - 1) / 2.0 - 0.5)
               / count(*) over ({part}) end"""


def adult_pay_sql(ages: tuple[int, int]) -> str:
    """``t_adult_pay``: mean PAYE pay over the years of the age window with PAYE pay."""
    b0, b1 = ages
    return f"""
        create or replace table t_adult_pay as
        select y.person_key child_key, avg(y.paye_pay) adult_pay, count(*) adult_pay_years
        from t_pay y join t_person p using (person_key)
        where y.year - p.birth_year between {b0} and {b1} and y.paye_pay > 0
        group by 1
    """


def children_sql(min_confidence: float, only: str | None = None, cohorts: str | None = None) -> str:
    """``t_children``: every person with a linked parent who was under 18 at some point in the data.

    ``only``: a table of person keys (``person_key``) to keep, when rebuilding some children's
    rows; ``cohorts``: a condition on ``p.birth_year`` limiting the children.
    """
    keep = f"and c.child_key in (select person_key from {only})" if only else ""
    keep += f" and {cohorts}" if cohorts else ""
    return f"""
        create or replace table t_children as
        select c.child_key, p.birth_year, c.parents
        from (select child_key, count(distinct parent_key) parents from parent_child
              where confidence >= {min_confidence!r} group by 1) c
        join t_person p on p.person_key = c.child_key, data_window w
        where p.birth_year >= w.y0 - 17 and p.birth_year <= w.y1 {keep}
    """


def headline_cohort_sql() -> str:
    """``t_cohort``: the columns the headline mobility measures need (for the sensitivity analysis)."""
    return """
        create or replace table t_cohort as
        select k.child_key, k.birth_year, ch.parents_earnings,
               case when ch.parents_earnings > 0 then ln(ch.parents_earnings) end log_parents_earnings,
               a.adult_pay, ln(a.adult_pay) log_adult_pay
        from t_children k left join t_childhood ch using (child_key) left join t_adult_pay a using (child_key)
    """


def cohort_sql(childhood: tuple[int, int], neet: tuple[int, int], persistent_share: float) -> str:
    """``t_cohort``: the intergenerational cohort table (see ``schemas/research/cohort.toml``)."""
    a0, a1 = childhood
    n0, n1 = neet
    return f"""
        create or replace table t_cohort as
        with school as (select e.person_key child_key, count(*) school_years, count(*) filter (where e.fsm) fsm_years,
                               max(e.ks2_score) ks2_score, max(e.ks4_att8) ks4_att8,
                               arg_max(e.la_code, e.year) filter (where e.year - p.birth_year <= 16) la_at_16,
                               max(e.year) filter (where e.year - p.birth_year <= 16) year_at_16
                        from t_edu e join t_person p using (person_key)
                        where e.person_key in (select child_key from t_children) group by 1),
        dep as (select person_key, start_date, stop from t_claim
                where role = 'dependant' and benefit_type in {_IB}
                  and person_key in (select child_key from t_children)),
        runs as (select *, max(stop) over (partition by person_key order by start_date, stop
                                           rows between unbounded preceding and 1 preceding) prev_stop from dep),
        spell_ids as (select *, sum(case when prev_stop is null or start_date > prev_stop + 31 then 1 else 0 end)
                                    over (partition by person_key order by start_date, stop rows unbounded preceding) spell
                      from runs),
        spells as (select person_key child_key, spell, datediff('day', min(start_date), max(stop)) + 1 as spell_days
                   from spell_ids group by all),
        ben as (select child_key, count(*) benefit_spells, sum(spell_days) * 12.0 / 365.25 benefit_months,
                       max(spell_days) * 12.0 / 365.25 longest_spell_months
                from spells group by 1),
        neet as (select k.child_key, count(*) neet_window_years,
                        count(*) filter (where e.person_key is null and coalesce(y.paye_pay, 0) = 0) neet_years
                 from (select child_key, birth_year, unnest(range(greatest(w.y0, birth_year + {n0}),
                                                                  least(w.y1, birth_year + {n1}) + 1)) as year
                       from t_children, data_window w) k
                 left join t_edu e on e.person_key = k.child_key and e.year = k.year
                 left join t_pay y on y.person_key = k.child_key and y.year = k.year
                 group by 1),
        base as (
            select k.child_key, k.birth_year, p.sex, s.la_at_16, r.region_code region_at_16, k.parents,
                   k.birth_year + {a0} >= w.y0 and k.birth_year + {a1} <= w.y1 full_childhood_window,
                   coalesce(ch.childhood_years, 0) childhood_years, ch.parents_earnings,
                   case when ch.parents_earnings > 0 then ln(ch.parents_earnings) end log_parents_earnings,
                   ch.household_income,
                   coalesce(s.school_years, 0) school_years, coalesce(s.fsm_years, 0) fsm_years,
                   s.fsm_years / s.school_years fsm_share,
                   case when s.school_years > 0 then s.fsm_years > 0 end ever_fsm,
                   case when s.school_years > 0 then s.fsm_years >= {persistent_share!r} * s.school_years end
                       persistent_fsm,
                   coalesce(b.benefit_spells, 0) benefit_spells, coalesce(b.benefit_months, 0) benefit_months,
                   coalesce(b.longest_spell_months, 0) longest_spell_months,
                   f.fsm_rate area_fsm_rate, s.ks2_score, s.ks4_att8,
                   a.adult_pay, ln(a.adult_pay) log_adult_pay, coalesce(a.adult_pay_years, 0) adult_pay_years,
                   coalesce(n.neet_years, 0) neet_years, coalesce(n.neet_window_years, 0) neet_window_years
            from t_children k join t_person p on p.person_key = k.child_key cross join data_window w
            left join t_childhood ch using (child_key) left join school s using (child_key)
            left join la_region r on r.la_code = s.la_at_16
            left join t_la_fsm f on f.la_code = s.la_at_16 and f.year = s.year_at_16
            left join ben b using (child_key) left join t_adult_pay a using (child_key)
            left join neet n using (child_key))
        select *, {_percentile("parents_earnings")} parents_earnings_percentile,
                  {_percentile("household_income")} household_income_percentile,
                  {_percentile("adult_pay")} adult_pay_percentile
        from base
    """
