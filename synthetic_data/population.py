"""The synthetic population: people, families, households and addresses over time.

Everything is vectorised over people with numpy; one seeded generator per purpose.

The life-course model (one year at a time, ``start_year`` to ``end_year``):

* A *family* forms when a couple (or a lone parent) sets up home, up to three years
  before its first child; it has one to four children, one to five years apart.
  Before forming, each founding adult lives alone (if 18 or over in the window).
* Couples separate at ``separation_rate``: the father moves to a household of his own;
  the children stay with their mother, who takes a new partner (a step-parent, who
  moves in) at ``repartner_rate``.
* Children leave home at 18-24 into a household of their own; many later partner with
  someone from outside the population's families (an *entrant*), who moves in with
  them. A woman partnering in the window takes her partner's surname at
  ``surname_change_on_partnership``.
* People who belong to no family (*singles*) fill the population to exactly ``persons``.
* Every household moves house at ``move_rate`` a year, crossing an LA boundary at
  ``move_between_la_share``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from linkage.config import GenerateConfig
from synthetic_data.rand import choice_by_group, explode, ffill_index, group_starts, rng_for, sorted_unique
from synthetic_data.reference import ETHNICITIES, Names, Places

# person kinds
MOTHER, FATHER, CHILD, STEP, ENTRANT, SINGLE = range(6)
KIND_NAMES = ("resident_parent", "other_parent", "child", "step_parent", "entrant", "single")
# roles in a household-year
HEAD, PARTNER, KID = range(3)
ROLE_NAMES = ("head", "partner", "child")

NINO_FIRST = "ABCEGHJKLMNOPRSTWXYZ"
NINO_SECOND = "ABCEGHJKLMNPRSTWXYZ"
NINO_BAD_PREFIX = {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}
INWARD_LETTERS = np.array(list("ABDEFGHJLNPQRSTUWXYZ"))


@dataclass
class Population:
    """The true state of the world (the generator's ground truth)."""

    # persons (index = person id)
    sex: np.ndarray            # int8: 0 male, 1 female
    dob: np.ndarray            # datetime64[D]
    kind: np.ndarray           # int8, see KIND_NAMES
    family: np.ndarray         # int32, -1 if none
    ethnicity: np.ndarray      # int8 index into ETHNICITIES
    forename: np.ndarray       # int32 vocab id
    middle1: np.ndarray        # int32 vocab id or -1
    middle2: np.ndarray        # int32 vocab id or -1
    surname_a: np.ndarray      # int32 vocab id: surname before any change
    surname_b: np.ndarray      # int32 vocab id: surname after change (== a if none)
    surname_change_year: np.ndarray  # int16, 9999 if none
    hyphenated: np.ndarray     # bool: surname has two parts
    nino: np.ndarray           # str array
    vocab: list[str]           # name vocabulary (grows as corruptions add strings)
    # person-years (sorted by person, year)
    py_person: np.ndarray
    py_year: np.ndarray
    py_hh: np.ndarray
    py_role: np.ndarray
    py_addr: np.ndarray        # address spell id
    # household-years (sorted by household, year)
    hy_hh: np.ndarray
    hy_year: np.ndarray
    hy_addr: np.ndarray
    hy_moved: np.ndarray       # bool: household moved this year
    # address spells
    addr_hh: np.ndarray
    addr_la: np.ndarray        # int index into Places
    addr_postcode: np.ndarray  # str
    addr_line: np.ndarray      # str
    # parent-child relations
    pc_parent: np.ndarray
    pc_child: np.ndarray
    pc_kind: np.ndarray        # 0 birth parent, 1 step-parent

    @property
    def n(self) -> int:
        """Number of persons."""
        return len(self.sex)

    def surname_in(self, person: np.ndarray, year: np.ndarray) -> np.ndarray:
        """Vocab id of each person's surname in the given year."""
        return np.where(year >= self.surname_change_year[person], self.surname_b[person], self.surname_a[person])

    def person_year_index(self, person: np.ndarray, year: np.ndarray) -> np.ndarray:
        """Row index into the person-year arrays (-1 where the person is not present that year)."""
        key = self.py_person.astype(np.int64) * 4096 + self.py_year
        q = person.astype(np.int64) * 4096 + year
        i = np.searchsorted(key, q)
        i = np.minimum(i, len(key) - 1)
        return np.where(key[i] == q, i, -1)


def _birth_dates(rng: np.random.Generator, year: np.ndarray) -> np.ndarray:
    jan1 = (year - 1970).astype("datetime64[Y]").astype("datetime64[D]")
    ndays = ((year + 1 - 1970).astype("datetime64[Y]").astype("datetime64[D]") - jan1).astype(int)
    return jan1 + np.floor(rng.random(len(year)) * ndays).astype(int)


def _ninos(rng: np.random.Generator, n: int) -> np.ndarray:
    prefixes = [a + b for a in NINO_FIRST for b in NINO_SECOND if a + b not in NINO_BAD_PREFIX]
    space = len(prefixes) * 1_000_000
    codes = rng.choice(space, size=n, replace=False)
    pre = np.array(prefixes)[codes // 1_000_000]
    num = np.char.zfill((codes % 1_000_000).astype(str), 6)
    suffix = np.array(list("ABCD"))[rng.integers(0, 4, n)]
    return np.char.add(np.char.add(pre, num), suffix)


class _Builder:
    """Accumulates persons, households and membership spells while families are built."""

    def __init__(self):
        self.persons: dict[str, list] = {k: [] for k in ("sex", "by", "kind", "family", "eth")}
        self.n = 0
        self.hh_la: list[np.ndarray] = []
        self.n_hh = 0
        self.spells: dict[str, list] = {k: [] for k in ("p", "hh", "a", "b", "role")}

    def add_persons(self, sex, by, kind, family, eth) -> np.ndarray:
        m = len(sex)
        for k, v in zip(("sex", "by", "kind", "family", "eth"), (sex, by, kind, family, eth)):
            self.persons[k].append(np.broadcast_to(np.asarray(v), (m,)).astype(np.int32))
        ids = np.arange(self.n, self.n + m, dtype=np.int32)
        self.n += m
        return ids

    def add_households(self, la: np.ndarray) -> np.ndarray:
        self.hh_la.append(np.asarray(la, dtype=np.int32))
        ids = np.arange(self.n_hh, self.n_hh + len(la), dtype=np.int32)
        self.n_hh += len(la)
        return ids

    def add_spells(self, p, hh, a, b, role) -> None:
        keep = b >= a
        for k, v in zip(("p", "hh", "a", "b", "role"), (p, hh, a, b, role)):
            self.spells[k].append(np.broadcast_to(np.asarray(v), keep.shape)[keep].astype(np.int32))

    def alone_before(self, rng, people, by, union_year, y0, places, la_near=None) -> None:
        """Give each person a household of their own from age 18 until the union year."""
        a = np.maximum(y0, by + 18)
        b = union_year - 1
        has = b >= a
        la = rng.choice(len(places.la_code), size=int(has.sum()), p=places.la_weight)
        if la_near is not None:
            near = rng.random(len(la)) < 0.5
            la = np.where(near, la_near[has], la)
        hh = self.add_households(la)
        self.add_spells(people[has], hh, a[has], b[has], HEAD)

    def cat(self, key: str, group: str) -> np.ndarray:
        parts = getattr(self, group)[key] if group != "hh_la" else self.hh_la
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def simulate_population(cfg: GenerateConfig, places: Places, names: Names) -> tuple[Population, dict]:
    """Simulate the whole population's lives in the window.

    Args:
        cfg: generator settings (size, seed, years and life-course rates).
        places: local authorities and postcode districts.
        names: name vocabularies.

    Returns:
        The :class:`Population` and a dict of per-family facts the economy needs
        (``family_main_hh``, ``family_lone``, ``family_la``).
    """
    y0, y1, n_target = cfg.start_year, cfg.end_year, cfg.persons
    r = rng_for(cfg.seed, "families")
    b = _Builder()
    n_la = len(places.la_code)
    eth_p = np.array([e[1] for e in ETHNICITIES])
    eth_p = eth_p / eth_p.sum()

    # ---- families: drawn in surplus, then cut so the total fits exactly
    F = n_target // 3 + 8
    lone = r.random(F) < cfg.lone_parent_share
    lone_father = lone & (r.random(F) < 0.1)
    n_kids = r.choice([1, 2, 3, 4], p=[0.3, 0.4, 0.2, 0.1], size=F)
    first_birth = r.integers(y0 - 18, y1 - 1, size=F)
    gaps = r.geometric(0.45, size=(F, 4))
    gaps[:, 0] = 0
    kid_by = first_birth[:, None] + np.cumsum(gaps, axis=1)
    kid_ok = (np.arange(4)[None, :] < n_kids[:, None]) & (kid_by <= y1)
    mother_by = first_birth - np.clip(np.rint(r.normal(28, 5.5, F)), 17, 42).astype(int)
    father_by = mother_by + np.clip(np.rint(r.normal(2, 3, F)), -5, 12).astype(int)
    formed = np.maximum(y0, first_birth - r.integers(0, 4, F))
    sep_lo = np.maximum(first_birth + 1, y0 + 1)
    sep = ~lone & (r.random(F) < cfg.separation_rate) & (sep_lo <= y1)
    sep_year = np.where(sep, sep_lo + np.floor(r.random(F) * (y1 - sep_lo + 1)).astype(int), 9999)
    rp_year = sep_year + r.integers(1, 5, F)
    rp = sep & (r.random(F) < cfg.repartner_rate) & (rp_year <= y1)
    fam_eth = r.choice(len(ETHNICITIES), size=F, p=eth_p)

    kf, kj = np.nonzero(kid_ok)          # kids: family, birth order
    k_by = kid_by[kf, kj]
    k_sex = r.integers(0, 2, len(kf))
    k_leave = k_by + r.integers(18, 25, len(kf))
    k_py = np.maximum(k_by + r.integers(24, 33, len(kf)), k_leave + 1)
    k_partnered = (k_leave <= y1 - 1) & (r.random(len(kf)) < 0.55) & (k_py <= y1)

    per_family = (1 + ~lone) + np.bincount(kf, minlength=F) + rp + np.bincount(kf, weights=k_partnered, minlength=F).astype(int)
    keep_f = np.cumsum(per_family) <= n_target
    Fk = int(keep_f.sum()) if keep_f.all() else int(np.argmin(keep_f))
    fam = np.arange(Fk)
    kid_keep = kf < Fk

    main_la = r.choice(n_la, size=Fk, p=places.la_weight)
    main_hh = b.add_households(main_la)

    # resident parent (usually the mother) and the other parent
    res_sex = np.where(lone_father[:Fk], 0, 1)
    res_by = np.where(lone_father[:Fk], father_by[:Fk], mother_by[:Fk])
    res = b.add_persons(res_sex, res_by, MOTHER, fam, fam_eth[:Fk])
    couple = ~lone[:Fk]
    oth_f = fam[couple]
    oth = b.add_persons(np.zeros(len(oth_f)), father_by[oth_f], FATHER, oth_f, fam_eth[oth_f])
    other_of_family = np.full(Fk, -1, dtype=np.int32)
    other_of_family[oth_f] = oth

    b.alone_before(r, res, res_by, formed[:Fk], y0, places)
    b.alone_before(r, oth, father_by[oth_f], formed[oth_f], y0, places)
    b.add_spells(res, main_hh, formed[:Fk], np.full(Fk, y1), HEAD)
    oth_end = np.where(sep[oth_f], sep_year[oth_f] - 1, y1)
    b.add_spells(oth, main_hh[oth_f], formed[oth_f], oth_end, PARTNER)
    sf = oth_f[sep[oth_f]]
    near = r.random(len(sf)) < 0.6
    new_la = np.where(near, main_la[sf], r.choice(n_la, size=len(sf), p=places.la_weight))
    father_hh = b.add_households(new_la)
    b.add_spells(other_of_family[sf], father_hh, sep_year[sf], np.full(len(sf), y1), HEAD)

    # children
    kf, kj, k_by, k_sex, k_leave, k_py, k_partnered = (
        a[kid_keep] for a in (kf, kj, k_by, k_sex, k_leave, k_py, k_partnered))
    kids = b.add_persons(k_sex, k_by, CHILD, kf, fam_eth[kf])
    b.add_spells(kids, main_hh[kf], np.maximum(formed[kf], np.maximum(y0, k_by)),
                 np.minimum(k_leave - 1, y1), KID)
    leaves = k_leave <= y1
    near = r.random(int(leaves.sum())) < 0.6
    own_la = np.where(near, main_la[kf[leaves]], r.choice(n_la, size=int(leaves.sum()), p=places.la_weight))
    kid_own_hh = np.full(len(kids), -1, dtype=np.int32)
    kid_own_hh[leaves] = b.add_households(own_la)
    b.add_spells(kids[leaves], kid_own_hh[leaves], k_leave[leaves], np.full(int(leaves.sum()), y1), HEAD)

    # step-parents join the resident parent's household
    rf = fam[rp[:Fk]]
    step_by = res_by[rf] + np.rint(r.normal(1, 3, len(rf))).astype(int)
    steps = b.add_persons(1 - res_sex[rf], step_by, STEP, rf, r.choice(len(ETHNICITIES), size=len(rf), p=eth_p))
    b.alone_before(r, steps, step_by, rp_year[rf], y0, places, la_near=main_la[rf])
    b.add_spells(steps, main_hh[rf], rp_year[rf], np.full(len(rf), y1), PARTNER)

    # entrants partner adult children and move in with them
    pk = np.nonzero(k_partnered)[0]
    ent_sex = 1 - k_sex[pk]
    ent_by = k_by[pk] + np.rint(r.normal(0, 2, len(pk))).astype(int) + np.where(ent_sex == 0, 1, -1)
    ents = b.add_persons(ent_sex, ent_by, ENTRANT, np.full(len(pk), -1),
                         r.choice(len(ETHNICITIES), size=len(pk), p=eth_p))
    b.alone_before(r, ents, ent_by, k_py[pk], y0, places)
    b.add_spells(ents, kid_own_hh[pk], k_py[pk], np.full(len(pk), y1), PARTNER)

    # singles fill the population to exactly n_target
    n_single = n_target - b.n
    s_by = r.integers(y1 - 75, y1 - 17, n_single)
    singles = b.add_persons(r.integers(0, 2, n_single), s_by, SINGLE, np.full(n_single, -1),
                            r.choice(len(ETHNICITIES), size=n_single, p=eth_p))
    s_hh = b.add_households(r.choice(n_la, size=n_single, p=places.la_weight))
    b.add_spells(singles, s_hh, np.maximum(y0, s_by + 18), np.full(n_single, y1), HEAD)
    assert b.n == n_target

    sex = b.cat("sex", "persons").astype(np.int8)
    by = b.cat("by", "persons")
    kind = b.cat("kind", "persons").astype(np.int8)
    family = b.cat("family", "persons")
    eth = b.cat("eth", "persons").astype(np.int8)
    hh_la = b.cat("la", "hh_la")

    # ---- person-years
    sp = {k: b.cat(k, "spells") for k in ("p", "hh", "a", "b", "role")}
    idx, year = explode(sp["a"], sp["b"])
    order = np.lexsort((year, sp["p"][idx]))
    py_person, py_year = sp["p"][idx][order], year[order].astype(np.int16)
    py_hh, py_role = sp["hh"][idx][order], sp["role"][idx][order].astype(np.int8)

    # ---- household-years, moves and address spells
    r = rng_for(cfg.seed, "addresses")
    hkey = sorted_unique(py_hh.astype(np.int64) * 4096 + py_year)
    hy_hh, hy_year = (hkey // 4096).astype(np.int32), (hkey % 4096).astype(np.int16)
    first = group_starts(hy_hh)
    moved = ~first & (r.random(len(hy_hh)) < cfg.move_rate)
    new_spell = first | moved
    hy_addr = (np.cumsum(new_spell) - 1).astype(np.int32)
    s_idx = np.nonzero(new_spell)[0]
    addr_hh = hy_hh[s_idx]
    between = moved[s_idx] & (r.random(len(s_idx)) < cfg.move_between_la_share)
    cand = np.where(first[s_idx], hh_la[addr_hh], np.where(between, r.choice(n_la, size=len(s_idx), p=places.la_weight), -1))
    addr_la = cand[ffill_index(cand >= 0)].astype(np.int32)
    n_addr = len(s_idx)
    dist = places.la_first_district[addr_la] + np.floor(r.random(n_addr) * places.la_n_districts[addr_la]).astype(int)
    inward = np.char.add(np.char.add(r.integers(1, 10, n_addr).astype(str), INWARD_LETTERS[r.integers(0, 20, n_addr)]),
                         INWARD_LETTERS[r.integers(0, 20, n_addr)])
    addr_postcode = np.char.add(np.char.add(places.district[dist], " "), inward)
    house = np.minimum(1 + np.floor(r.exponential(30, n_addr)).astype(int), 400).astype(str)
    street = names.streets[0][r.choice(len(names.streets[0]), size=n_addr, p=names.streets[1])]
    stype = names.street_types[0][r.choice(len(names.street_types[0]), size=n_addr, p=names.street_types[1])]
    addr_line = np.char.add(np.char.add(np.char.add(np.char.add(house, " "), street), " "), stype)

    hy_key = hy_hh.astype(np.int64) * 4096 + hy_year
    py_addr = hy_addr[np.searchsorted(hy_key, py_hh.astype(np.int64) * 4096 + py_year)]

    # ---- identities
    r = rng_for(cfg.seed, "identities")
    dob = _birth_dates(r, by)
    group = np.array([e[2] for e in ETHNICITIES])[eth]
    sexc = np.where(sex == 1, "F", "M")
    keys = np.char.add(np.char.add(sexc, "|"), group)
    fore_tables = {f"{s}|{g}": v for (s, g), v in names.forenames.items()}
    forename = choice_by_group(r, keys, fore_tables, "M|white")
    # parents do not give two of their children the same forename
    for _ in range(20):
        key = family[kids].astype(np.int64) * (1 << 24) + forename[kids]
        order = np.argsort(key, kind="stable")
        dup = np.zeros(len(kids), dtype=bool)
        dup[order[1:]] = key[order[1:]] == key[order[:-1]]
        if not dup.any():
            break
        forename[kids[dup]] = choice_by_group(r, keys[kids[dup]], fore_tables, "M|white")
    n_mid = r.choice([0, 1, 2], p=[0.25, 0.6, 0.15], size=len(sex))
    m1 = np.where(n_mid >= 1, choice_by_group(r, keys, fore_tables, "M|white"), -1)
    m2 = np.where(n_mid >= 2, choice_by_group(r, keys, fore_tables, "M|white"), -1)
    m1 = np.where(m1 == forename, -1, m1)
    sur = choice_by_group(r, group, names.surnames, "white")
    vocab = list(names.vocab)
    # children carry the family surname: the father's if there is one, else the resident parent's
    fam_head = np.where(other_of_family >= 0, other_of_family, res)
    is_kid = kind == CHILD
    sur[is_kid] = sur[fam_head[family[is_kid]]]
    # most mothers in couples share the father's surname by the window's start
    takes = couple & (r.random(Fk) < 0.7)
    sur[res[takes]] = sur[other_of_family[takes]]
    hyph = r.random(len(sex)) < cfg.hyphenated_surname_share
    other_sur = choice_by_group(r, group, names.surnames, "white")
    hyph &= other_sur != sur
    start = len(vocab)
    vocab.extend(f"{vocab[a]}-{vocab[c]}" for a, c in zip(sur[hyph], other_sur[hyph]))
    sur[hyph] = np.arange(start, len(vocab), dtype=np.int32)

    # surname changes when women partner in the window
    sur_b = sur.copy()
    change = np.full(len(sex), 9999, dtype=np.int16)
    women_k = kids[pk][k_sex[pk] == 1]
    their_ent = ents[k_sex[pk] == 1]
    women_e = ents[ent_sex == 1]
    their_kid = kids[pk][ent_sex == 1]
    women_s = res[rf][res_sex[rf] == 1]
    their_step = steps[res_sex[rf] == 1]
    w = np.concatenate([women_k, women_e, women_s])
    partner = np.concatenate([their_ent, their_kid, their_step])
    when = np.concatenate([k_py[pk][k_sex[pk] == 1], k_py[pk][ent_sex == 1], rp_year[rf][res_sex[rf] == 1]])
    ch = r.random(len(w)) < cfg.surname_change_on_partnership
    sur_b[w[ch]] = sur[partner[ch]]
    change[w[ch]] = when[ch]

    nino = _ninos(rng_for(cfg.seed, "nino"), len(sex))

    # parent-child relations
    birth_parents = np.concatenate([res[kf], other_of_family[kf]])
    birth_kids = np.concatenate([kids, kids])
    ok = birth_parents >= 0
    in_rp = rp[kf]
    step_of_fam = np.full(Fk, -1, dtype=np.int32)
    step_of_fam[rf] = steps
    # a step-parent is a parent only of children still at home when they moved in
    lived = in_rp & (k_leave - 1 >= rp_year[kf])
    step_pairs_k, step_pairs_p = kids[lived], step_of_fam[kf[lived]]
    pc_parent = np.concatenate([birth_parents[ok], step_pairs_p])
    pc_child = np.concatenate([birth_kids[ok], step_pairs_k])
    pc_kind = np.concatenate([np.zeros(int(ok.sum()), np.int8), np.ones(int(lived.sum()), np.int8)])

    pop = Population(
        sex=sex, dob=dob, kind=kind, family=family, ethnicity=eth, forename=forename,
        middle1=m1.astype(np.int32), middle2=m2.astype(np.int32), surname_a=sur, surname_b=sur_b,
        surname_change_year=change, hyphenated=hyph, nino=nino, vocab=vocab,
        py_person=py_person, py_year=py_year, py_hh=py_hh, py_role=py_role, py_addr=py_addr,
        hy_hh=hy_hh, hy_year=hy_year, hy_addr=hy_addr, hy_moved=moved,
        addr_hh=addr_hh, addr_la=addr_la, addr_postcode=addr_postcode, addr_line=addr_line,
        pc_parent=pc_parent, pc_child=pc_child, pc_kind=pc_kind,
    )
    facts = {"family_main_hh": main_hh, "family_lone": lone[:Fk], "family_la": main_la,
             "family_other": other_of_family, "family_res": res}
    return pop, facts
