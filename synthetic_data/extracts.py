"""Turn the simulated world into the three departmental extracts and their truth rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from linkage.config import GenerateConfig
from synthetic_data.corruptions import BIT, Rows, Vocab, apply_field_corruptions
from synthetic_data.economy import INCOME_BENEFITS, Economy
from synthetic_data.population import CHILD, HEAD, KID, PARTNER, Population
from synthetic_data.rand import explode, group_starts, mix64, rng_for
from synthetic_data.reference import ETHNICITIES, Names, Places

UPN_CHECK = "ABCDEFGHJKLMNPQRTUVWXYZ"


@dataclass
class Extract:
    """One source's rows, already in delivery order: columns are built a slice at a time."""

    source: str
    n: int
    prefix: str                # record_id prefix
    width: int                 # record_id digits
    columns: Callable[[slice], dict[str, pa.Array]]   # the delivered columns after record_id
    truth: pa.Table            # record_id, person_id, household_id, year, corruptions, eligible

    def batches(self, size: int = 1_000_000):
        """Yield record batches of the delivered table, record_id first."""
        for start in range(0, self.n, size):
            sl = slice(start, min(start + size, self.n))
            cols = {"record_id": _numbered(self.prefix, np.arange(sl.start + 1, sl.stop + 1), self.width),
                    **self.columns(sl)}
            yield pa.record_batch(cols)


class Shared:
    """Vocabularies and lookups shared by the three sources."""

    def __init__(self, pop: Population, names: Names):
        self.pop = pop
        self.names = Vocab(pop.vocab)
        self.postcodes = Vocab(pop.addr_postcode.tolist())
        self.ninos = Vocab(pop.nino.tolist())
        self.variants = names.variants
        self.addr_lines = pa.array(pop.addr_line.tolist(), type=pa.string())
        self.prev_addr = np.full(len(pop.py_person), -1, dtype=np.int32)
        same = np.zeros(len(pop.py_person), dtype=bool)
        same[1:] = (pop.py_person[1:] == pop.py_person[:-1]) & (pop.py_year[1:] == pop.py_year[:-1] + 1)
        self.prev_addr[1:][same[1:]] = pop.py_addr[:-1][same[1:]]
        self.moved = (self.prev_addr >= 0) & (self.prev_addr != pop.py_addr)


def _strings(vocab: Vocab | pa.Array, ids: np.ndarray) -> pa.Array:
    arr = vocab if isinstance(vocab, pa.Array) else vocab.arrow()
    return arr.take(pa.array(ids, mask=ids < 0, type=pa.int32()))


def _labels(values, idx: np.ndarray) -> pa.Array:
    """Strings from a small list of labels, by index (no per-row Python or numpy strings)."""
    return pa.array(list(values), type=pa.string()).take(pa.array(np.asarray(idx, dtype=np.int32)))


def _numbered(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """Identifiers such as C000000123: a prefix and a zero-padded number."""
    digits = pc.utf8_lpad(pc.cast(pa.array(np.asarray(numbers, dtype=np.int64)), pa.string()), width, "0")
    return pc.binary_join_element_wise(pa.scalar(prefix), digits, "")


def _year_labels(y0: int, y1: int, sep: str) -> list[str]:
    return [f"{y}{sep}{(y + 1) % 100:02d}" for y in range(y0, y1 + 1)]


def _identity_rows(sh: Shared, py_idx: np.ndarray, with_nino: np.ndarray, cfg: GenerateConfig,
                   rng: np.random.Generator, extra_flags: np.ndarray | None = None) -> tuple[Rows, np.ndarray]:
    """Build the identifier fields for person-year rows, then corrupt them."""
    pop = sh.pop
    p, yr = pop.py_person[py_idx], pop.py_year[py_idx]
    n = len(py_idx)
    flags = np.zeros(n, np.int32) if extra_flags is None else extra_flags.astype(np.int32)
    eligible = np.zeros(n, np.int32)
    # stale address: the year after a move, the previous address is still on file
    addr = pop.py_addr[py_idx].copy()
    moved = sh.moved[py_idx]
    eligible[moved] |= BIT["stale_address"]
    stale = moved & (rng.random(n) < cfg.errors.stale_address)
    flags[stale] |= BIT["stale_address"]
    addr[stale] = sh.prev_addr[py_idx][stale]
    changed = yr >= pop.surname_change_year[p]
    flags[changed] |= BIT["surname_after_partnership"]
    eligible[changed] |= BIT["surname_after_partnership"]
    rows = Rows(
        forename=pop.forename[p].copy(), middle1=pop.middle1[p].copy(), middle2=pop.middle2[p].copy(),
        surname=pop.surname_in(p, yr).astype(np.int32), dob=pop.dob[p].copy(), sex=pop.sex[p].astype(np.int8),
        postcode=addr.astype(np.int32), nino=np.where(with_nino, p, -1).astype(np.int32),
        names=sh.names, postcodes=sh.postcodes, ninos=sh.ninos, variants=sh.variants,
        flags=flags, eligible=eligible, max_dob=np.datetime64(f"{cfg.end_year}-12-31"),
    )
    apply_field_corruptions(rows, cfg.errors, rng)
    return rows, addr


def _duplicate(py_idx: np.ndarray, cols: dict, rate: float, rng) -> tuple[np.ndarray, dict, np.ndarray]:
    """Deliver some rows twice: the copy goes through corruption on its own."""
    dup = np.nonzero(rng.random(len(py_idx)) < rate)[0]
    flags = np.zeros(len(py_idx) + len(dup), np.int32)
    flags[len(py_idx):] = BIT["duplicate_record"]
    cols = {k: np.concatenate([v, v[dup]]) for k, v in cols.items()}
    return np.concatenate([py_idx, py_idx[dup]]), cols, flags


def _middle(sh: Shared, rows: Rows, s: slice) -> pa.Array:
    m1, m2 = _strings(sh.names, rows.middle1[s]), _strings(sh.names, rows.middle2[s])
    both = pc.utf8_trim_whitespace(pc.binary_join_element_wise(m1, m2, " ", null_handling="replace", null_replacement=""))
    return pc.if_else(pc.is_null(m1), pa.nulls(len(m1), pa.string()), both)


def _shuffle(rng, py_idx: np.ndarray, base: dict, rows: Rows, *extra: np.ndarray):
    """Put rows in delivery order (a seeded shuffle, so row order says nothing about people)."""
    perm = rng.permutation(len(py_idx))
    return (py_idx[perm], {k: v[perm] for k, v in base.items()}, rows.take(perm), *(e[perm] for e in extra))


def _truth(pop: Population, prefix: str, width: int, py_idx: np.ndarray, rows: Rows) -> pa.Table:
    return pa.table({
        "record_id": _numbered(prefix, np.arange(1, len(py_idx) + 1), width),
        "person_id": pa.array(pop.py_person[py_idx]), "household_id": pa.array(pop.py_hh[py_idx]),
        "year": pa.array(pop.py_year[py_idx]), "corruptions": pa.array(rows.flags),
        "eligible": pa.array(rows.eligible),
    })


def _dates(d: np.ndarray) -> pa.Array:
    return pa.array(d.astype("datetime64[D]"), type=pa.date32())


def _sex(s: np.ndarray) -> pa.Array:
    return pa.array(["M", "F"], type=pa.string()).take(pa.array(s.astype(np.int32), mask=s < 0))


def education(sh: Shared, eco: Economy, places: Places, cfg: GenerateConfig) -> tuple[Extract, np.ndarray]:
    """One row per pupil per academic year (Reception to Year 11)."""
    pop = sh.pop
    rng = rng_for(cfg.seed, "education")
    p, yr = pop.py_person, pop.py_year.astype(np.int64)
    by = pop.dob.astype("datetime64[Y]").astype(np.int64) + 1970
    month = (pop.dob.astype("datetime64[M]").astype(np.int64) % 12) + 1
    age_aug = yr - by[p] - (month[p] > 8)
    sel = np.nonzero((pop.kind[p] == CHILD) & (pop.py_role == KID) & (age_aug >= 4) & (age_aug <= 15))[0]
    ygroup = (age_aug[sel] - 4).astype(np.int64)
    la = pop.addr_la[pop.py_addr[sel]]
    hy_key = pop.hy_hh.astype(np.int64) * 4096 + pop.hy_year
    hy_i = np.searchsorted(hy_key, pop.py_hh[sel].astype(np.int64) * 4096 + pop.py_year[sel])

    # schools: pools per LA, primary for Reception-Year 6 and secondary for Years 7-11
    n_prim = 3 * places.la_n_districts + 2
    n_sec = places.la_n_districts + 1
    prim_first = np.concatenate([[0], np.cumsum(n_prim + n_sec)[:-1]])
    n_schools = int((n_prim + n_sec).sum())
    urns = rng.choice(np.arange(100000, 1000000), size=n_schools, replace=False)
    secondary = ygroup >= 7
    h = mix64(p[sel].astype(np.int64) * 1024 + la * 2 + secondary)
    pool = np.where(secondary, n_sec[la], n_prim[la])
    school = prim_first[la] + np.where(secondary, n_prim[la], 0) + (h % pool.astype(np.uint64)).astype(np.int64)

    # UPN: issued at a pupil's first row, from its LA, school and year
    first = np.ones(len(sel), bool)
    first[1:] = p[sel][1:] != p[sel][:-1]
    fi = np.nonzero(first)[0]
    la_no = 201 + la[fi]
    estab = 2000 + (school[fi] - prim_first[la[fi]])
    yy = yr[sel][fi] % 100
    gkey = (la_no * 10000 + estab) * 100 + yy
    order = np.argsort(gkey, kind="stable")
    g_sorted = gkey[order]
    starts = group_starts(g_sorted)
    rank = np.arange(len(order)) - np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
    serial = np.empty(len(order), np.int64)
    serial[order] = rank
    body = ((la_no * 10000 + estab) * 100 + yy) * 1000 + serial % 1000
    digits = np.array([(body // 10 ** (11 - k)) % 10 for k in range(12)])
    check = (digits * np.arange(2, 14)[:, None]).sum(axis=0) % 23
    upn_pupil = pc.binary_join_element_wise(
        _labels(UPN_CHECK, check), pc.utf8_lpad(pc.cast(pa.array(body), pa.string()), 12, "0"), "")
    upn = upn_pupil.take(pa.array(np.cumsum(first) - 1))

    # attainment: household income that year and the child's own ability
    li = np.log(np.maximum(eco.hy_equiv[hy_i], 2000.0))
    zinc = (li - li.mean()) / (li.std() or 1.0)
    ab = eco.ability[p[sel]]
    ks2 = np.where(ygroup == 6, np.clip(np.rint(104 + 3.5 * zinc + 5 * ab + rng.normal(0, 2, len(sel))), 80, 120), np.nan)
    ks4 = np.where(ygroup == 11, np.clip(np.round(46 + 6 * zinc + 11 * ab + rng.normal(0, 4, len(sel)), 1), 0, 90), np.nan)
    eth_codes = np.array([e[0] for e in ETHNICITIES])

    base = {"sel": sel, "hy": hy_i, "ygroup": ygroup, "la": la, "school": school, "upn": np.arange(len(sel)),
            "ks2": ks2, "ks4": ks4}
    py_idx, base, dflags = _duplicate(sel, base, cfg.errors.duplicate_record, rng)
    rows, _ = _identity_rows(sh, py_idx, np.zeros(len(py_idx), bool), cfg, rng, dflags)
    py_idx, base, rows = _shuffle(rng, py_idx, base, rows)
    pp = pop.py_person[py_idx]
    years = pop.py_year[py_idx].astype(np.int64)
    ay_labels = _year_labels(cfg.start_year, cfg.end_year, "/")

    def columns(s: slice) -> dict[str, pa.Array]:
        ks2, ks4 = base["ks2"][s], base["ks4"][s]
        return {
            "academic_year": _labels(ay_labels, years[s] - cfg.start_year),
            "upn": upn.take(pa.array(base["upn"][s])),
            "forename": _strings(sh.names, rows.forename[s]),
            "middle_names": _middle(sh, rows, s),
            "surname": _strings(sh.names, rows.surname[s]),
            "dob": _dates(rows.dob[s]),
            "sex": _sex(rows.sex[s]),
            "ethnicity": _labels(eth_codes, pop.ethnicity[pp[s]]),
            "postcode": _strings(sh.postcodes, rows.postcode[s]),
            "la_code": _labels(places.la_code, base["la"][s]),
            "school_urn": pa.array(urns[base["school"][s]].astype(np.int64)),
            "year_group": pa.array(base["ygroup"][s].astype(np.int64)),
            "fsm": pa.array(eco.hy_fsm[base["hy"][s]].astype(np.int64)),
            "sen": _labels("NKE", eco.sen[pp[s]]),
            "ks2_score": pa.array(ks2, mask=np.isnan(ks2), type=pa.float64()).cast(pa.int64()),
            "ks4_att8": pa.array(ks4, mask=np.isnan(ks4), type=pa.float64()),
        }

    ext = Extract("education", len(py_idx), "EDU", 9, columns, _truth(pop, "EDU", 9, py_idx, rows))
    pupil_of_person = np.full(pop.n, -1, dtype=np.int32)
    pupil_of_person[p[sel][fi]] = np.arange(len(fi))
    return ext, upn_pupil.take(pa.array(pupil_of_person, mask=pupil_of_person < 0))


def _claims(pop: Population, active: np.ndarray, sig: np.ndarray, kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of consecutive household-years with the same benefit and members: (first, last) hy index."""
    idx = np.nonzero(active)[0]
    if not len(idx):
        return idx, idx
    new = np.ones(len(idx), bool)
    new[1:] = ((pop.hy_hh[idx[1:]] != pop.hy_hh[idx[:-1]]) | (pop.hy_year[idx[1:]] != pop.hy_year[idx[:-1]] + 1)
               | (sig[idx[1:]] != sig[idx[:-1]]) | (kind[idx[1:]] != kind[idx[:-1]]))
    starts = np.nonzero(new)[0]
    ends = np.concatenate([starts[1:], [len(idx)]]) - 1
    return idx[starts], idx[ends]


def benefits(sh: Shared, eco: Economy, cfg: GenerateConfig) -> Extract:
    """One row per member of the benefit unit per claim."""
    pop = sh.pop
    rng = rng_for(cfg.seed, "benefits")
    p, yr = pop.py_person, pop.py_year.astype(np.int64)
    by = pop.dob.astype("datetime64[Y]").astype(np.int64) + 1970
    age = yr - by[p]
    hy_key = pop.hy_hh.astype(np.int64) * 4096 + pop.hy_year
    hy_i = np.searchsorted(hy_key, pop.py_hh.astype(np.int64) * 4096 + pop.py_year)
    n_hy = len(pop.hy_hh)
    adult = np.isin(pop.py_role, (HEAD, PARTNER))
    dep = (pop.py_role == KID) & (age < 16)
    h = (mix64(p.astype(np.int64)) >> np.uint64(12)).astype(np.float64)
    sig_all = np.bincount(hy_i, weights=np.where(adult | dep, h, 0.0), minlength=n_hy)
    # Child Benefit's claimant: the woman among the adults, else the head
    fem_adult = adult & (pop.sex[p] == 1)
    cb_claimant = np.full(n_hy, -1, np.int64)
    cb_claimant[hy_i[(pop.py_role == HEAD)]] = p[pop.py_role == HEAD]
    cb_claimant[hy_i[fem_adult]] = p[fem_adult]
    sig_cb = np.bincount(hy_i, weights=np.where(dep, h, 0.0), minlength=n_hy) + cb_claimant
    s1, e1 = _claims(pop, eco.hy_benefit >= 0, sig_all, eco.hy_benefit)
    s2, e2 = _claims(pop, eco.hy_cb, sig_cb, np.zeros(n_hy, np.int8))
    c_start = np.concatenate([s1, s2])
    c_end = np.concatenate([e1, e2])
    c_type = np.concatenate([eco.hy_benefit[s1], np.full(len(s2), len(INCOME_BENEFITS))])
    # members at the claim's start: rows of the person-year table in that household-year
    order = np.argsort(hy_i, kind="stable")
    lo = np.searchsorted(hy_i[order], c_start, "left")
    hi = np.searchsorted(hy_i[order], c_start, "right")
    ci, pos = explode(lo, hi - 1)
    mrow = order[pos]
    is_cb = c_type[ci] == len(INCOME_BENEFITS)
    claimant = np.where(is_cb, p[mrow] == cb_claimant[c_start[ci]], pop.py_role[mrow] == HEAD)
    partner = ~is_cb & adult[mrow] & ~claimant
    dependant = dep[mrow]
    keep = claimant | partner | dependant
    ci, mrow, claimant, partner = ci[keep], mrow[keep], claimant[keep], partner[keep]
    role = np.where(claimant, 0, np.where(partner, 1, 2))
    o = np.lexsort((pop.dob[p[mrow]].astype(np.int64), role, ci))
    ci, mrow, role = ci[o], mrow[o], role[o]
    first = group_starts(ci)
    member_no = np.arange(len(ci)) - np.maximum.accumulate(np.where(first, np.arange(len(ci)), 0)) + 1

    # benefit unit: the claimant and household; claim ids and dates
    claimant_of_claim = np.full(len(c_start), -1, np.int64)
    claimant_of_claim[ci[role == 0]] = p[mrow[role == 0]]
    unit_key = pop.hy_hh[c_start].astype(np.int64) * (1 << 32) + claimant_of_claim
    _, unit = np.unique(unit_key, return_inverse=True)
    unit_ids = rng.permutation(int(unit.max()) + 1 if len(unit) else 0) + 1
    claim_no = rng.permutation(len(c_start)) + 1
    y_start = pop.hy_year[c_start].astype(np.int64)
    y_end = pop.hy_year[c_end].astype(np.int64)
    jan1 = (y_start - 1970).astype("datetime64[Y]").astype("datetime64[D]")
    dec31 = (y_end + 1 - 1970).astype("datetime64[Y]").astype("datetime64[D]") - 1
    start_date = jan1 + rng.integers(0, 181, len(c_start))
    end_date = dec31 - rng.integers(0, 181, len(c_start))
    open_claim = y_end >= cfg.end_year

    base = {"ci": ci, "role": role, "member_no": member_no}
    py_idx, base, dflags = _duplicate(mrow, base, cfg.errors.duplicate_record, rng)
    rows, addr = _identity_rows(sh, py_idx, base["role"] < 2, cfg, rng, dflags)
    py_idx, base, rows, addr = _shuffle(rng, py_idx, base, rows, addr)
    ci, role = base["ci"], base["role"]
    names = list(INCOME_BENEFITS) + ["CB"]

    def columns(s: slice) -> dict[str, pa.Array]:
        c = ci[s]
        return {
            "claim_id": _numbered("C", claim_no[c], 9),
            "benefit_unit_id": _numbered("BU", unit_ids[unit[c]], 8),
            "member_no": pa.array(base["member_no"][s].astype(np.int64)),
            "role": _labels(["claimant", "partner", "dependant"], role[s]),
            "nino": _strings(sh.ninos, rows.nino[s]),
            "forename": _strings(sh.names, rows.forename[s]),
            "middle_names": _middle(sh, rows, s),
            "surname": _strings(sh.names, rows.surname[s]),
            "dob": _dates(rows.dob[s]),
            "sex": _sex(rows.sex[s]),
            "address_line": sh.addr_lines.take(pa.array(addr[s])),
            "postcode": _strings(sh.postcodes, rows.postcode[s]),
            "benefit_type": _labels(names, c_type[c]),
            "start_date": _dates(start_date[c]),
            "end_date": pa.array(end_date[c].astype("datetime64[D]"), mask=open_claim[c], type=pa.date32()),
        }

    return Extract("benefits", len(py_idx), "BEN", 9, columns, _truth(pop, "BEN", 9, py_idx, rows))


def earnings(sh: Shared, eco: Economy, cfg: GenerateConfig) -> Extract:
    """One row per employment per tax year."""
    pop = sh.pop
    rng = rng_for(cfg.seed, "earnings")
    n_emp = max(200, pop.n // 20)
    codes = rng.choice(900 * 26 * 26 * 100000, size=n_emp, replace=False)
    office = 100 + codes // (26 * 26 * 100000)
    rest = codes % (26 * 26 * 100000)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    emp_refs = pa.array([f"{o}/{letters[a]}{letters[b]}{c:05d}" for o, a, b, c in zip(
        office.tolist(), (rest // 2600000).tolist(), ((rest // 100000) % 26).tolist(), (rest % 100000).tolist())])
    # job spells: a person changes employer at 15% a year
    change = rng.random(len(pop.py_person)) < 0.15
    change[group_starts(pop.py_person)] = True
    spell = np.cumsum(change)
    rows_py, job = explode(np.zeros(len(pop.py_person), np.int64), eco.py_jobs.astype(np.int64) - 1)
    share = np.where(eco.py_jobs[rows_py] == 2, np.where(job == 0, 0.7, 0.3), 1.0)
    pay = np.round(eco.py_pay[rows_py] * share, 2)
    employer = (mix64(spell[rows_py].astype(np.int64) * 4 + job + cfg.seed * 7919) % np.uint64(n_emp)).astype(np.int64)
    base = {"pay": pay, "employer": employer}
    py_idx, base, dflags = _duplicate(rows_py, base, cfg.errors.duplicate_record, rng)
    rows, addr = _identity_rows(sh, py_idx, np.ones(len(py_idx), bool), cfg, rng, dflags)
    py_idx, base, rows, addr = _shuffle(rng, py_idx, base, rows, addr)
    years = pop.py_year[py_idx]
    ty_labels = _year_labels(cfg.start_year, cfg.end_year, "-")

    def columns(s: slice) -> dict[str, pa.Array]:
        return {
            "tax_year": _labels(ty_labels, years[s] - cfg.start_year),
            "nino": _strings(sh.ninos, rows.nino[s]),
            "forename": _strings(sh.names, rows.forename[s]),
            "middle_names": _middle(sh, rows, s),
            "surname": _strings(sh.names, rows.surname[s]),
            "dob": _dates(rows.dob[s]),
            "sex": _sex(rows.sex[s]),
            "address_line": sh.addr_lines.take(pa.array(addr[s])),
            "postcode": _strings(sh.postcodes, rows.postcode[s]),
            "employer_ref": emp_refs.take(pa.array(base["employer"][s])),
            "pay": pa.array(base["pay"][s]),
        }

    return Extract("earnings", len(py_idx), "ERN", 10, columns, _truth(pop, "ERN", 10, py_idx, rows))
