"""Pay, benefits, free school meals and attainment, with the planted intergenerational link.

The model, in real (constant-price) terms:

* Adults outside the founding children have a permanent log-pay level
  ``a = mu_sex + delta_LA + N(0, 0.5)``; each year they are in PAYE employment with a
  probability rising in ``a`` (lower for mothers of under-fives, and for the
  self-employed parent of a family with income outside PAYE), and earn
  ``exp(a + age profile + N(0, 0.2))``.
* **The planted elasticity.** For each founding child, ``x`` is the log of the mean
  PAYE earnings of the parents it lives with (resident parent, other parent,
  step-parent) over its ages 10-16 inside the window. Its adult permanent level is
  ``a = mu_sex + ige * (x - log 35000) + gamma_LA16 + N(0, 0.4)``, where ``gamma_LA16``
  is the effect of the LA it lived in at 16. So the within-cohort slope of log mean pay
  at 25-30 on ``x`` is ``ige``.
* Households whose equivalised income (PAYE plus income outside PAYE, OECD modified
  scale) falls below a threshold claim an income-related benefit (take-up
  ``benefit_take_up``): Universal Credit from its roll-out, before that Income Support
  for lone parents, ESA for some, JSA otherwise. Families with children under 16 claim
  Child Benefit. FSM follows receipt of an income-related benefit, and for Universal
  Credit low PAYE earnings, so families with income outside PAYE can be poor in PAYE
  terms yet not on FSM.
* KS2 and KS4 attainment rise with household income and with a child's own ability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from linkage.config import GenerateConfig
from synthetic_data.population import CHILD, FATHER, HEAD, KID, MOTHER, PARTNER, STEP, Population
from synthetic_data.rand import group_starts, rng_for

MU = np.log([30000.0, 21000.0])      # by sex: 0 male, 1 female
X_REF = np.log(35000.0)
BENEFIT_THRESHOLD = 9000.0           # equivalised annual income
UC_FSM_EARNINGS = 7400.0
INCOME_BENEFITS = ("UC", "JSA", "ESA", "IS")


@dataclass
class Economy:
    """Per person-year pay and per household-year income, benefits and FSM (truth)."""

    py_pay: np.ndarray          # float, PAYE pay (0 if none)
    py_jobs: np.ndarray         # int8, number of employments (0..2)
    hy_paye: np.ndarray         # household PAYE total
    hy_other: np.ndarray        # income outside PAYE
    hy_equiv: np.ndarray        # equivalised total income
    hy_benefit: np.ndarray      # int8: -1 none, else index into INCOME_BENEFITS
    hy_cb: np.ndarray           # bool: Child Benefit in payment
    hy_fsm: np.ndarray          # bool: children eligible for FSM
    la_delta: np.ndarray        # LA effect on parents' pay
    la_gamma: np.ndarray        # LA effect on children's adult pay
    child_x: np.ndarray         # per person: log parental PAYE earnings at 10-16 (nan if not a founding child)
    child_x_years: np.ndarray   # per person: years observed at ages 10-16
    child_la16: np.ndarray      # per person: LA at 16 (or last childhood year), -1 if none
    ability: np.ndarray         # per person: standard normal
    sen: np.ndarray             # per person: 0 N, 1 K, 2 E


def _hy_index(pop: Population) -> np.ndarray:
    """Index of each person-year's household-year."""
    key = pop.hy_hh.astype(np.int64) * 4096 + pop.hy_year
    return np.searchsorted(key, pop.py_hh.astype(np.int64) * 4096 + pop.py_year).astype(np.int32)


def _pay(r, a, age, employed_p):
    emp = r.random(len(a), dtype=np.float32) < employed_p
    prof = -0.001 * (age - 47.0) ** 2
    return np.where(emp, np.exp(a + prof + r.normal(0, 0.2, len(a))), 0.0)


def simulate_economy(cfg: GenerateConfig, pop: Population, facts: dict, n_la: int) -> Economy:
    """Simulate pay, household income, benefits, FSM and ability for the population."""
    r = rng_for(cfg.seed, "economy")
    n = pop.n
    p = pop.py_person
    by = (pop.dob.astype("datetime64[Y]").astype(np.int64) + 1970).astype(np.int16)
    age = pop.py_year - by[p]
    hy_i = _hy_index(pop)
    n_hy = len(pop.hy_hh)
    la_delta = r.normal(0, cfg.la_effect_sd, n_la)
    la_gamma = r.normal(0, cfg.la_effect_sd, n_la)
    la_py = pop.addr_la[pop.py_addr]

    # families with income outside PAYE: one parent is self-employed
    n_fam = len(facts["family_main_hh"])
    non_paye_fam = r.random(n_fam) < cfg.non_paye_share
    self_emp = np.zeros(n, dtype=bool)
    selfp = np.where(facts["family_other"] >= 0, facts["family_other"], facts["family_res"])
    self_emp[selfp[non_paye_fam]] = True
    hh_other_level = np.zeros(int(pop.hy_hh.max()) + 1 if n_hy else 0)
    hh_other_level[facts["family_main_hh"][non_paye_fam]] = np.exp(r.normal(np.log(18000), 0.5, int(non_paye_fam.sum())))

    # under-fives per household-year (lowers mothers' employment)
    u5 = np.zeros(n_hy, dtype=bool)
    u5[hy_i[(pop.py_role == KID) & (age < 5)]] = True

    # ---- adults other than founding children
    first_la = np.full(n, -1, dtype=np.int32)
    firsts = np.ones(len(p), dtype=bool)
    firsts[1:] = p[1:] != p[:-1]
    first_la[p[firsts]] = la_py[firsts]
    z = r.normal(0, 1, n)
    a = MU[pop.sex] + la_delta[first_la] + 0.5 * z
    is_child = pop.kind == CHILD
    adult_rows = ~is_child[p] & (age >= 18) & (age <= 66)
    emp_p = (1 / (1 + np.exp(-(1.7 + 1.0 * z.astype(np.float32)[p])))).astype(np.float32)
    emp_p = np.where((pop.sex[p] == 1) & u5[hy_i], emp_p * 0.7, emp_p)
    emp_p = np.where(self_emp[p], emp_p * 0.2, emp_p)
    pay = np.zeros(len(p))
    pay[adult_rows] = _pay(r, a[p[adult_rows]], age[adult_rows], emp_p[adult_rows])
    # every parent has at least one PAYE year, so each child's parents are findable in the data
    parent_kind = np.isin(pop.kind, (MOTHER, FATHER, STEP))
    never = parent_kind & (np.bincount(p, weights=pay, minlength=n) == 0)
    cand = np.nonzero(never[p] & (age >= 16))[0]
    if len(cand):
        pick = cand[group_starts(p[cand])]
        pay[pick] = np.exp(a[p[pick]] + r.normal(0, 0.2, len(pick)))

    # ---- the planted link: parents' PAYE earnings over the child's ages 10-16
    parent_role = np.isin(pop.py_role, (HEAD, PARTNER)) & np.isin(pop.kind[p], (MOTHER, FATHER, STEP))
    hy_parent_pay = np.bincount(hy_i[parent_role], weights=pay[parent_role], minlength=n_hy)
    win = is_child[p] & (pop.py_role == KID) & (age >= 10) & (age <= 16)
    sums = np.bincount(p[win], weights=hy_parent_pay[hy_i[win]], minlength=n)
    cnt = np.bincount(p[win], minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(is_child & (cnt > 0) & (sums > 0), np.log(sums / np.maximum(cnt, 1)), np.nan)
    # LA at 16: the last childhood year up to 16
    la16 = np.full(n, -1, dtype=np.int32)
    kidrows = np.nonzero(is_child[p] & (pop.py_role == KID) & (age <= 16))[0]
    la16[p[kidrows]] = la_py[kidrows]          # later rows overwrite: rows are sorted by year
    la16 = np.where(is_child & (la16 < 0), first_la, la16)
    zc = r.normal(0, 1, n)
    xa = np.where(np.isnan(x), X_REF, x)
    a_child = MU[pop.sex] + cfg.ige * (xa - X_REF) + la_gamma[np.maximum(la16, 0)] + 0.4 * zc
    ch_rows = is_child[p] & (age >= 18) & (age <= 66)
    zz = (a_child[p] - MU[pop.sex[p]]) / 0.45
    ch_p = np.where(age < 22, np.float32(0.55), 1 / (1 + np.exp(-(2.0 + 0.8 * zz.astype(np.float32)))))
    del zz
    pay[ch_rows] = _pay(r, a_child[p[ch_rows]], age[ch_rows], ch_p[ch_rows])
    pay = np.round(pay, 2)
    jobs = np.where(pay > 0, 1 + (r.random(len(p)) < 0.12), 0).astype(np.int8)

    # ---- household income, benefits and FSM
    hy_paye = np.bincount(hy_i, weights=pay, minlength=n_hy)
    hy_other = hh_other_level[pop.hy_hh] * np.exp(r.normal(0, 0.2, n_hy)) if n_hy else np.zeros(0)
    hy_other = np.where(hh_other_level[pop.hy_hh] > 0, hy_other, 0.0)
    n14 = np.bincount(hy_i, weights=age >= 14, minlength=n_hy)
    nu14 = np.bincount(hy_i, weights=age < 14, minlength=n_hy)
    scale = 1 + 0.5 * np.maximum(n14 - 1, 0) + 0.3 * nu14
    equiv = (hy_paye + hy_other) / scale
    hh_u = r.random(int(pop.hy_hh.max()) + 1 if n_hy else 0)
    disabled = r.random(len(hh_u)) < 0.15
    uc_u = r.random(len(hh_u))
    claims = (equiv < BENEFIT_THRESHOLD) & (hh_u[pop.hy_hh] < cfg.benefit_take_up)
    year = pop.hy_year
    on_uc = (year >= 2018) | ((year >= 2013) & (uc_u[pop.hy_hh] < (year - 2012) / 6))
    n_partner = np.bincount(hy_i, weights=pop.py_role == PARTNER, minlength=n_hy)
    n_kids = np.bincount(hy_i, weights=(pop.py_role == KID) & (age < 16), minlength=n_hy)
    legacy = np.where((n_partner == 0) & (n_kids > 0), 3, np.where(disabled[pop.hy_hh], 2, 1))
    benefit = np.where(claims, np.where(on_uc, 0, legacy), -1).astype(np.int8)
    fsm = (benefit >= 1) | ((benefit == 0) & (hy_paye < UC_FSM_EARNINGS))
    top_pay = np.zeros(n_hy)
    np.maximum.at(top_pay, hy_i, pay)
    cb_u = r.random(len(hh_u))
    opt_out = (year >= 2013) & (top_pay > 60000) & (cb_u[pop.hy_hh] < 0.5)
    cb = (n_kids > 0) & (cb_u[pop.hy_hh] < 0.97) & ~opt_out

    ability = r.normal(0, 1, n)
    sen_u = r.random(n) + 0.1 * np.clip(-ability, 0, None)
    sen = np.where(sen_u > 1.0 - 0.03, 2, np.where(sen_u > 1.0 - 0.15, 1, 0)).astype(np.int8)
    return Economy(
        py_pay=pay, py_jobs=jobs, hy_paye=hy_paye, hy_other=hy_other, hy_equiv=equiv,
        hy_benefit=benefit, hy_cb=cb, hy_fsm=fsm, la_delta=la_delta, la_gamma=la_gamma,
        child_x=x, child_x_years=cnt.astype(np.int16), child_la16=la16, ability=ability, sen=sen,
    )
