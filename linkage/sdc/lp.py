"""Secondary suppression, checked by linear programming against an adversary who knows the margins.

A table with margins is a system of linear equations: at every level of every dimension
a parent cell equals the sum of its children (local authorities within their region,
regions within the total), for every combination of the other dimensions. Counts and
magnitude totals satisfy these exactly, because margins are computed from the same units.

An adversary who sees the published cells knows every equation and every published
value, and that counts (and totals of non-negative values) are at least zero. For each
suppressed cell the linear programs ``min x_c`` and ``max x_c`` over that system give the
*feasible interval* the adversary can narrow the cell to. The protection range of a cell
is ``P = max(protection_count, protection_ratio * value)`` for counts and
``max(protection_ratio * |total|, p% shortfall)`` for magnitude totals, and:

* every suppressed cell's interval, primary and secondary alike, must reach ``P`` above
  its true value and ``P`` below it, or down to the a-priori bound (the upper and lower
  protection levels of tau-Argus), so the adversary cannot pin it near either end. The
  adversary is assumed to know the threshold and every rule: published cells all carry
  one status ``suppressed``, so the adversary cannot tell a primary cell (fewer than
  ``threshold`` units) from a secondary one, and a secondary cell must be as well
  protected as a primary one.

Several tables released together (the standard tables, or an on-demand answer and
everything released before it) are audited as one system: their equations are stacked
over a shared set of cells, where cells of different tables holding exactly the same
units are one cell (:func:`merge_cells`).

:func:`protect` adds complementary suppressions until every suppressed cell (primary and
secondary) is protected in every system:

1. *closure*: while an equation has exactly one suppressed cell, suppress another cell of
   that equation (the cheapest: large enough to cover the protection, at the finest level,
   smallest value);
2. *audit*: solve the interval LPs (HiGHS, through ``highspy``) for every suppressed cell not
   yet shown protected;
3. for each under-protected cell, suppress the cheapest unsuppressed cell sharing an
   equation with it, and repeat from 1.

The audit solves few LPs: a feasible point of any LP shows every cell's interval reaches
at least that point's value, so one LP that pushes all unprotected cells up at once (each
capped at its target, so the LP stays bounded) settles most of them; only the remaining
cells get an LP of their own, whose optimum is exact. What was shown stays valid as the
suppression pattern grows, because the feasible region only grows. Independent
components of suppressed cells are solved separately, each as one HiGHS model whose
equations are loaded once: between solves only the objective and the column bounds change,
so HiGHS re-solves from the previous basis (a fraction of a millisecond for the tables the
table builder makes, against about 5 ms for a fresh ``scipy.optimize.linprog``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import highspy
import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from linkage.sdc.spec import TOTAL
from linkage.compat.highs import quiet_highs

log = logging.getLogger(__name__)


@dataclass
class System:
    """One additive measure over the table's cells, as the adversary's LP sees it.

    Fields:
        name: ``count`` or the magnitude column's name (for the report).
        values: the true value of every cell (never written anywhere).
        lower: the a-priori lower bound of every cell (0, or -inf for signed values).
        need: the protection ``P`` a cell needs when it is suppressed.
        A: the equations this measure satisfies, when they differ from the count's (a joint
            audit of tables that do not all carry the measure); ``None``: the count's.
    """

    name: str
    values: np.ndarray
    lower: float
    need: np.ndarray
    A: sparse.csr_matrix | None = None


class LPBudgetExceeded(RuntimeError):
    """Secondary suppression needed more linear programs than the request's budget."""


@dataclass
class Audit:
    """What :func:`protect` did, without any cell value (safe for the report).

    Fields:
        rounds: closure-and-audit rounds run.
        lps: linear programs solved.
        secondary: cells suppressed to protect others.
        audited: suppressed cells whose intervals were checked, per system.
        protected: whether every suppressed cell passed in every system.
        fallback: the round limit was hit and the whole table was suppressed.
        joint_with: the other tables (or earlier releases) audited in the same system.
    """

    rounds: int = 0
    lps: int = 0
    secondary: int = 0
    audited: dict[str, int] = field(default_factory=dict)
    protected: bool = True
    fallback: bool = False
    joint_with: tuple[str, ...] = ()


def parent_of(node: tuple[str, ...]) -> tuple[str, ...] | None:
    """The node one level up (its last non-Total value replaced by Total); ``None`` for the Total."""
    k = sum(v != TOTAL for v in node)
    if k == 0:
        return None
    return node[:k - 1] + (TOTAL,) * (len(node) - k + 1)


def equations(nodes: list[list[tuple[str, ...]]]) -> sparse.csr_matrix:
    """The margin equations of a full grid of cells as a sparse matrix ``A`` with ``A @ cells = 0``.

    Cells are numbered in C order over the dimensions' node lists (``itertools.product``).
    Each row is ``parent - sum(children) = 0`` for one dimension, one parent node and one
    combination of the other dimensions' nodes.
    """
    shape = tuple(len(n) for n in nodes)
    rows, cols, vals = [], [], []
    r = 0
    for d, dnodes in enumerate(nodes):
        pos = {t: i for i, t in enumerate(dnodes)}
        children: dict[int, list[int]] = {}
        for i, t in enumerate(dnodes):
            p = parent_of(t)
            if p is not None:
                children.setdefault(pos[p], []).append(i)
        others = [range(s) for k, s in enumerate(shape) if k != d]
        other_grid = np.array(np.meshgrid(*others, indexing="ij")).reshape(len(others), -1).T if others else \
            np.zeros((1, 0), dtype=np.int64)
        for p, kids in children.items():
            for o in other_grid:
                idx = list(o)
                members = [p, *kids]
                coefs = [1.0] + [-1.0] * len(kids)
                for node_i, coef in zip(members, coefs):
                    full = idx[:d] + [node_i] + idx[d:]
                    rows.append(r)
                    cols.append(int(np.ravel_multi_index(full, shape)))
                    vals.append(coef)
                r += 1
    n = int(np.prod(shape))
    return sparse.csr_matrix((vals, (rows, cols)), shape=(r, n))


def linked_groups(A: sparse.csr_matrix, cols: np.ndarray) -> list[np.ndarray]:
    """The cells ``cols`` in groups linked by sharing an equation (directly or through each other)."""
    B = A[:, cols]
    B = B[np.asarray((B != 0).sum(axis=1)).ravel() > 0]
    adj = (abs(B).T @ abs(B)).tocsr()
    k, labels = connected_components(adj, directed=False)
    return [cols[labels == i] for i in range(k)]


class IntervalModel:
    """One component's equations ``Ac @ x = b`` as a HiGHS model; each solve sets only costs and bounds."""

    def __init__(self, Ac: sparse.csr_matrix, b: np.ndarray):
        self.n = Ac.shape[1]
        self.idx = np.arange(self.n, dtype=np.int32)
        h = quiet_highs()
        h.setOptionValue("threads", 1)
        h.setOptionValue("presolve", "off")   # re-solves start from the previous basis
        h.setOptionValue("simplex_strategy", 4)   # primal: a changed objective keeps the basis feasible
        h.addVars(self.n, np.zeros(self.n), np.full(self.n, highspy.kHighsInf))
        Ac = Ac.tocsr()
        h.addRows(Ac.shape[0], b, b, Ac.nnz, Ac.indptr[:-1].astype(np.int32), Ac.indices.astype(np.int32),
                  Ac.data.astype(float))
        self.h = h

    def solve(self, cost: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray | None:
        """Minimise ``cost @ x`` within the bounds (``±inf`` for none); ``None`` unless optimal."""
        h, inf = self.h, highspy.kHighsInf
        h.changeColsCost(self.n, self.idx, cost.astype(float))
        h.changeColsBounds(self.n, self.idx, np.where(np.isneginf(lower), -inf, lower).astype(float),
                           np.where(np.isposinf(upper), inf, upper).astype(float))
        h.run()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return None
        return np.asarray(h.getSolution().col_value, dtype=float)


class _Auditor:
    """The LP audit of one system: the widest interval seen for each cell so far, and its requirement."""

    def __init__(self, A: sparse.csr_matrix, system: System, budget: list[float]):
        self.A = A if system.A is None else system.A
        self.s = system
        self.budget = budget   # [linear programs left], shared by every system's auditor
        self.scope: np.ndarray | None = None   # cells of the new release (None: every cell)
        self.known: np.ndarray | None = None   # cells published by an earlier release
        # every LP solution is a feasible point: it widens what the adversary cannot rule out
        self.hi = system.values.astype(float).copy()
        self.lo = system.values.astype(float).copy()
        self.lps = 0

    def _tol(self, cols):
        return 1e-7 * np.maximum(1.0, np.abs(self.s.values[cols]) + self.s.need[cols])

    def targets(self, cols):
        """(up, down): the values each cell must be able to reach (capped/floored in the LPs)."""
        v, P = self.s.values[cols], self.s.need[cols]
        return v + P, np.maximum(self.s.lower, v - P)

    def satisfied(self, cols, direction: str) -> np.ndarray:
        """Whether each cell reaches its protection on one side (upper or lower)."""
        up, down = self.targets(cols)
        tol = self._tol(cols)
        return self.hi[cols] >= up - tol if direction == "up" else self.lo[cols] <= down + tol

    def _solve(self, model: IntervalModel, cols, obj, bounds):
        self.lps += 1
        self.budget[0] -= 1
        if self.budget[0] < 0:
            raise LPBudgetExceeded("secondary suppression exceeded its budget of linear programs")
        x = model.solve(obj, *bounds)
        if x is None:   # cannot happen for a consistent system; then nothing is confirmed
            log.warning("disclosure LP not optimal (%s) on a component of %d cells", self.s.name, len(cols))
            return None
        self.hi[cols] = np.maximum(self.hi[cols], x)
        self.lo[cols] = np.minimum(self.lo[cols], x)
        return x

    def audit(self, suppressed: np.ndarray) -> list[tuple[int, str, float]]:
        """Check every suppressed cell; return the failures as (cell, side to widen, shortfall)."""
        failures = []
        # a cell published by an earlier release is known, whatever this release withholds
        cols_all = np.flatnonzero(suppressed if self.known is None else suppressed & ~self.known)
        if not len(cols_all):
            return failures
        for cols in linked_groups(self.A, cols_all):
            if self.scope is not None and not self.scope[cols].any():
                continue   # no cell of the new release: its equations are those already audited
            if self.satisfied(cols, "up").all() and self.satisfied(cols, "down").all():
                continue
            rows = np.flatnonzero(np.asarray((self.A[:, cols] != 0).sum(axis=1)).ravel() > 0)
            Ac = self.A[rows][:, cols]
            model = IntervalModel(Ac, Ac @ self.s.values[cols])
            for direction in ("up", "down"):
                # group LPs: push every unsatisfied cell toward its target at once
                while True:
                    todo = ~self.satisfied(cols, direction)
                    if not todo.any():
                        break
                    before = int(todo.sum())
                    if self._solve(model, cols, *self._program(cols, todo, direction)) is None:
                        break
                    if int((~self.satisfied(cols, direction)).sum()) >= before or before == 1:
                        break
                # one LP each for the rest: its optimum is the exact end of the interval
                for i in np.flatnonzero(~self.satisfied(cols, direction)):
                    if self.satisfied(cols[i:i + 1], direction)[0]:
                        continue   # an earlier LP's solution already reached this one's target
                    todo = ~self.satisfied(cols, direction)
                    one = np.zeros(len(cols), dtype=bool)
                    one[i] = True
                    self._solve(model, cols, *self._program(cols, one, direction))
            up_ok, down_ok = self.satisfied(cols, "up"), self.satisfied(cols, "down")
            up, down = self.targets(cols)
            for i in np.flatnonzero(~(up_ok & down_ok)):
                c = int(cols[i])
                if not up_ok[i]:
                    failures.append((c, "up", float(up[i] - self.hi[c])))
                else:
                    failures.append((c, "down", float(self.lo[c] - down[i])))
        return failures

    def _program(self, cols, todo, direction):
        up, down = self.targets(cols)
        obj = np.where(todo, -1.0 if direction == "up" else 1.0, 0.0)
        lo = np.full(len(cols), self.s.lower, dtype=float)
        hi = np.full(len(cols), np.inf)
        # cap each pushed cell at its target: the LP stays bounded and spreads its effort
        if direction == "up":
            hi[todo] = up[todo]
        else:
            lo[todo] = np.maximum(lo[todo], down[todo])
        return obj, (lo, hi)

    def _reach(self, suppressed: np.ndarray) -> np.ndarray:
        # suppressed cells in a component holding a cell of the new release
        out = np.zeros(len(suppressed), dtype=bool)
        for cols in linked_groups(self.A, np.flatnonzero(suppressed)):
            if self.scope[cols].any():
                out[cols] = True
        return out

    def all_satisfied(self, suppressed: np.ndarray) -> bool:
        """Whether every suppressed cell meets its requirement on both sides."""
        if self.known is not None:
            suppressed = suppressed & ~self.known
        cols = np.flatnonzero(suppressed if self.scope is None else suppressed & self._reach(suppressed))
        return bool(self.satisfied(cols, "up").all() and self.satisfied(cols, "down").all())


def _partner(A: sparse.csr_matrix, csc: sparse.csc_matrix, cell: int, suppressed: np.ndarray, amount: float,
             values: np.ndarray, depth: np.ndarray, order: np.ndarray, rows: np.ndarray | None = None) -> int | None:
    # the cheapest available cell sharing an equation with `cell`: one that can absorb
    # `amount`, then at the finest level, then the smallest; ties by the cell's stable key
    # (not its position), so the pattern does not depend on how the table was laid out.
    # `suppressed` here also marks cells that may not be chosen (released before).
    eq_rows = csc.indices[csc.indptr[cell]:csc.indptr[cell + 1]] if rows is None else rows
    cand: set[int] = set()
    for r in eq_rows:
        cand.update(int(j) for j in A.indices[A.indptr[r]:A.indptr[r + 1]])
    cand = [j for j in cand if not suppressed[j]]
    if not cand:
        return None
    return min(cand, key=lambda j: (values[j] < amount, depth[j], values[j], order[j], j))


def protect(A: sparse.csr_matrix, primary: np.ndarray, systems: list[System], depth: np.ndarray,
            max_rounds: int = 200, order: np.ndarray | None = None, locked: np.ndarray | None = None,
            max_lps: int | None = None, scope: np.ndarray | None = None) -> tuple[np.ndarray, Audit]:
    """Choose secondary suppressions so that every suppressed cell is protected in every system.

    Args:
        A: the margin equations (:func:`equations`).
        primary: cells suppressed by the primary rules.
        systems: the additive measures to protect (the count first).
        depth: per cell, how many dimension levels are margins (finer cells are preferred).
        max_rounds: after this many rounds every cell is suppressed (a safe fallback).
        order: per cell, a stable key breaking ties between equally good complements
            (default: the cell's position).
        locked: cells that may not become secondary suppressions (already published).
        max_lps: the most linear programs to solve; beyond it :class:`LPBudgetExceeded`.
        scope: audit only groups of linked suppressed cells holding one of these cells (a new
            release's); groups without one have only equations an earlier audit passed.

    Returns:
        (suppressed mask, :class:`Audit`). Secondary cells are ``suppressed & ~primary``.

    Raises:
        LPBudgetExceeded: more than ``max_lps`` linear programs were needed.

    Example:
        >>> nodes = [[("Total",), ("a",), ("b",), ("c",)]]    # a + b + c = Total
        >>> A = equations(nodes)
        >>> counts = np.array([60.0, 3.0, 17.0, 40.0])
        >>> s = System("count", counts, 0.0, np.maximum(5, 0.1 * counts))
        >>> mask, audit = protect(A, np.array([False, True, False, False]), [s], np.array([1, 0, 0, 0]))
        >>> mask.tolist()      # b protects a; a + b = 20 keeps b below 17 + 5, so c joins: a, b, c in [0, 60]
        [False, True, True, True]
    """
    suppressed = primary.copy()
    audit = Audit()
    if not suppressed.any() or A.shape[0] == 0:
        return suppressed, audit
    count = systems[0]
    budget = [float("inf") if max_lps is None else float(max_lps)]
    auditors = [_Auditor(A, s, budget) for s in systems]
    for aud in auditors:
        aud.scope, aud.known = scope, (None if locked is None else locked.copy())
    csc = A.tocsc()
    searches = 0
    order = np.arange(len(primary)) if order is None else order
    locked = np.zeros(len(primary), dtype=bool) if locked is None else locked & ~primary
    for rnd in range(1, max_rounds + 1):
        audit.rounds = rnd
        _closure(A, csc, suppressed, count, depth, order, locked)
        failures = []
        for aud in auditors:
            failures += [(c, d, short, aud.s) for c, d, short in aud.audit(suppressed)]
        if not failures:
            break
        added: set[int] = set()
        busy: set[int] = set()   # equations a complement was added to in this round
        # one complement per neighbourhood and round, largest shortfall first: a complement
        # added for one cell often protects its neighbours too (fewer cells withheld)
        failures.sort(key=lambda f: (-f[2], order[f[0]], f[0]))
        for c, direction, short, system in failures:
            rows_c = set(csc.indices[csc.indptr[c]:csc.indptr[c + 1]].tolist())
            if rows_c & busy:
                continue
            # a cell that must rise needs a partner that can fall by the shortfall, and vice versa;
            # a cell can never exceed a published margin it adds up to: that margin must go first
            amount = short if direction == "up" else 0.0
            # the cheapest published cells whose release lets `c` reach its target (an LP over
            # every equation, so margins implied through other tables count too)
            budget[0] -= 1   # the complement search is a linear program too: it counts against the budget
            if budget[0] < 0:
                raise LPBudgetExceeded("secondary suppression exceeded its budget of linear programs")
            searches += 1
            picks = _complements(system.A if system.A is not None else A, c, direction, system, suppressed,
                                 locked, depth)
            if not picks:
                j = _capping_margin(A, csc, c, suppressed | locked, system) if direction == "up" else None
                if j is None:
                    j = _partner(A, csc, c, suppressed | locked, amount, system.values, depth, order)
                if j is None:   # its equations are all suppressed: widen through any neighbour of its component
                    j = _any_neighbour(A, csc, suppressed, locked, system.values, depth, order)
                picks = [] if j is None else [j]
            for j in picks:
                added.add(j)
                busy |= rows_c | set(csc.indices[csc.indptr[j]:csc.indptr[j + 1]].tolist())
        if not added:   # nothing left that could help: withhold everything rather than release
            log.warning("secondary suppression found no complement: suppressing the whole table")
            suppressed[:] = True
            audit.fallback = True
            break
        suppressed[list(added)] = True
    else:
        log.warning("secondary suppression did not converge in %d rounds: suppressing the whole table", max_rounds)
        suppressed[:] = True
        audit.fallback = True
    audit.lps = sum(a.lps for a in auditors) + searches
    audit.secondary = int((suppressed & ~primary).sum())
    audit.audited = {a.s.name: int(suppressed.sum()) for a in auditors}
    audit.protected = audit.fallback or all(a.all_satisfied(suppressed) for a in auditors)
    return suppressed, audit


def _closure(A: sparse.csr_matrix, csc: sparse.csc_matrix, suppressed: np.ndarray, count: System,
             depth: np.ndarray, order: np.ndarray, locked: np.ndarray) -> None:
    # no equation may hold exactly one suppressed cell: it would be its margin minus the rest
    while True:
        S = sparse.diags(suppressed.astype(float))
        per_row = np.asarray((abs(A) @ S).sum(axis=1)).ravel()
        single = np.flatnonzero(per_row == 1)
        if not len(single):
            return
        before = int(suppressed.sum())
        for r in single:
            cells = A.indices[A.indptr[r]:A.indptr[r + 1]]
            if suppressed[cells].sum() != 1:
                continue   # an earlier pick in this pass already fixed it
            c = int(cells[suppressed[cells]][0])
            j = _partner(A, csc, c, suppressed | locked, count.need[c], count.values, depth, order,
                         rows=np.array([r]))
            if j is not None:
                suppressed[j] = True
        if int(suppressed.sum()) == before:
            return   # no available complement (all locked): the audit decides


def _complements(A: sparse.csr_matrix, cell: int, direction: str, system: System, suppressed: np.ndarray,
                 locked: np.ndarray, depth: np.ndarray) -> list[int]:
    # min sum_j w_j |d_j| over published cells j, s.t. A d = 0, withheld cells stay >= their
    # a-priori bound and `cell` moves to its target: the published cells that must move are
    # the complements to withhold (the LP of tau-Argus's optimal secondary suppression)
    from scipy.optimize import linprog

    v, need = system.values, system.need
    free = suppressed | ~locked
    # only the cells linked to `cell` through withheld or movable cells take part
    part = next(c for c in linked_groups(A, np.flatnonzero(free)) if cell in c)
    s_idx = part[suppressed[part]]
    p_idx = part[~suppressed[part]]
    if not len(p_idx):
        return []
    rows = np.flatnonzero(np.asarray((A[:, part] != 0).sum(axis=1)).ravel() > 0)
    A = A[rows]
    As, Ap = A[:, s_idx], A[:, p_idx]
    w = 1.0 + depth[p_idx].astype(float) + 1e-6 * np.abs(v[p_idx])
    cost = np.concatenate([np.zeros(len(s_idx)), w, w])
    lo = np.where(np.isfinite(system.lower), system.lower - v[s_idx], -np.inf)
    hi = np.full(len(s_idx), np.inf)
    k = int(np.searchsorted(s_idx, cell))
    if direction == "up":
        lo[k] = max(lo[k], need[cell])
    else:
        hi[k] = min(hi[k], max(system.lower, v[cell] - need[cell]) - v[cell])
    bounds = np.vstack([np.column_stack([lo, hi]), np.tile([0.0, np.inf], (2 * len(p_idx), 1))])
    res = linprog(cost, A_eq=sparse.hstack([As, Ap, -Ap]).tocsr(), b_eq=np.zeros(A.shape[0]), bounds=bounds,
                  method="highs")
    if res.status != 0:
        return []
    x = res.x[len(s_idx):]
    moved = np.abs(x[:len(p_idx)] - x[len(p_idx):]) > 1e-7
    return [int(j) for j in p_idx[moved]]


def _capping_margin(A: sparse.csr_matrix, csc: sparse.csc_matrix, cell: int, unavailable: np.ndarray,
                    system: System) -> int | None:
    # the smallest available parent margin (coefficient +1 in an equation where `cell` has -1)
    # below the value `cell` must be able to reach
    target = system.values[cell] + system.need[cell]
    best = None
    for k in range(csc.indptr[cell], csc.indptr[cell + 1]):
        if csc.data[k] >= 0:
            continue
        r = csc.indices[k]
        row = slice(A.indptr[r], A.indptr[r + 1])
        for j, coef in zip(A.indices[row], A.data[row]):
            if coef > 0 and not unavailable[j] and system.values[j] < target - 1e-9:
                if best is None or system.values[j] < system.values[best]:
                    best = int(j)
    return best


def _any_neighbour(A, csc, suppressed, locked, values, depth, order) -> int | None:
    touched = np.asarray((abs(A) @ sparse.diags(suppressed.astype(float))).sum(axis=1)).ravel() > 0
    cand = np.unique(A[touched].indices)
    cand = [int(j) for j in cand if not (suppressed[j] or locked[j])]
    if not cand:
        return None
    return min(cand, key=lambda j: (depth[j], -values[j], order[j], j))


def merge_cells(identities: list[np.ndarray], labels: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], int]:
    """Number the cells of several tables jointly: the same cell in two tables is one cell.

    Two cells are the same when they have the same label (the same categories, see
    :func:`cell_labels`: what the adversary knows from the tables' definitions) and hold the
    same units: the same unit count and two 32-bit cell keys (sums of the units' keyed record
    keys; equal by chance about once in 2**64). Cells that merely hold the same units under
    different labels are not merged: an adversary cannot know it, and merging them would pin
    other cells (an LA whose children with FSM all had 1-2 years would force its 3-5 and 6+
    cells to zero). Empty cells are never merged.

    Args:
        identities: per table, an (N_t x 3) integer array of ``_n``, ``_ck1``, ``_ck2``.
        labels: per table, each cell's label (default: all equal, so the identity decides).

    Returns:
        (per table, the joint number of each of its cells; the number of joint cells).

    Example:
        >>> a = np.array([[5, 1, 2], [0, 0, 0]]); b = np.array([[0, 0, 0], [5, 1, 2]])
        >>> maps, n = merge_cells([a, b]); [m.tolist() for m in maps], n
        ([[0, 1], [2, 0]], 3)
    """
    # within one table, cells holding the same units (a margin and its only non-empty child)
    # stay distinct: its own equations already relate them, and merging them would tell the
    # adversary that the other children are empty
    index: dict[tuple, list[int]] = {}
    maps, g = [], 0
    for t, ident in enumerate(identities):
        m = np.empty(len(ident), dtype=np.int64)
        used: set[int] = set()
        lab = labels[t].tolist() if labels is not None else [""] * len(ident)
        for i, key in enumerate(map(tuple, np.asarray(ident, dtype=np.int64).tolist())):
            key = (*key, lab[i])
            j = None
            if key[0] > 0:
                j = next((v for v in index.get(key, ()) if v not in used), None)
            if j is None:
                j = g
                g += 1
                if key[0] > 0:
                    index.setdefault(key, []).append(j)
            used.add(j)
            m[i] = j
        maps.append(m)
    return maps, g


def stack(matrices: list[sparse.csr_matrix], maps: list[np.ndarray], size: int) -> sparse.csr_matrix:
    """Several tables' margin equations over their joint cells (see :func:`merge_cells`), as one matrix."""
    parts = []
    for A, m in zip(matrices, maps):
        M = sparse.csr_matrix((np.ones(len(m)), (np.arange(len(m)), m)), shape=(len(m), size))
        parts.append((A @ M).tocsr())
    out = sparse.vstack(parts).tocsr() if parts else sparse.csr_matrix((0, size))
    out.eliminate_zeros()
    # A margin merged with one of its children (they hold the same units) turns its equation
    # into "the other children sum to 0". Whether they do is not something the adversary
    # knows from the tables' definitions, and it would pin those empty cells at zero, so such
    # equations (all coefficients of one sign, or none left) are dropped.
    pos = np.asarray((out > 0).sum(axis=1)).ravel()
    neg = np.asarray((out < 0).sum(axis=1)).ravel()
    return out[(pos > 0) & (neg > 0)]


@dataclass
class Block:
    """One table in a joint audit: its equations, cell identities and what it withholds.

    Fields:
        name: the table's (or earlier release's) name, for the report.
        A: its margin equations (:func:`equations`).
        ident: per cell, ``_n``, ``_ck1``, ``_ck2`` (see :func:`merge_cells`).
        depth: per cell, how many dimension levels are margins.
        primary: cells withheld before secondary suppression (for an earlier release: every
            cell it withheld, which must stay withheld).
        systems: per additive measure name (``count`` first), (true values, a-priori lower
            bound, protection needed).
        released: an earlier release: its published cells are known and may not be withheld now.
        labels: per cell, its categories as one string (:func:`cell_labels`); cells of two
            blocks merge only under the same label.
        known: per cell, whether some earlier release published it (the adversary knows it,
            whatever this block withholds); ``None``: only what the blocks themselves publish.
    """

    name: str
    A: sparse.csr_matrix
    ident: np.ndarray
    depth: np.ndarray
    primary: np.ndarray
    systems: dict[str, tuple[np.ndarray, float, np.ndarray]]
    released: bool = False
    labels: np.ndarray | None = None
    known: np.ndarray | None = None


def protect_jointly(blocks: list[Block], max_rounds: int = 200,
                    max_lps: int | None = None) -> tuple[list[np.ndarray], Audit]:
    """One suppression pattern over several tables, audited by one LP over their union.

    Cells holding the same units in different tables are one cell (:func:`merge_cells`), so a
    cell withheld in one table is withheld in all, and each table's margins constrain the
    others' cells, as they would for an adversary holding every table. Cells published by an
    earlier release (``released`` blocks) are never chosen as complements.

    Returns:
        (per block, its suppressed mask; the joint :class:`Audit`).

    Raises:
        LPBudgetExceeded: more than ``max_lps`` linear programs were needed.
    """
    labels = [b.labels if b.labels is not None else np.full(len(b.ident), "") for b in blocks]
    maps, G = merge_cells([b.ident for b in blocks], labels)
    A = stack([b.A for b in blocks], maps, G)
    primary, locked = np.zeros(G, dtype=bool), np.zeros(G, dtype=bool)
    depth, order = np.full(G, np.iinfo(np.int64).max), np.zeros(G, dtype=np.int64)
    for b, m in zip(blocks, maps):
        np.logical_or.at(primary, m, b.primary)
        if b.released:
            locked[m[~b.primary]] = True
        if b.known is not None:
            locked[m[b.known]] = True
        np.minimum.at(depth, m, b.depth)
        order[m] = b.ident[:, 1]
    names = list(dict.fromkeys(n for b in blocks for n in b.systems))
    systems = []
    for name in names:
        has = [i for i, b in enumerate(blocks) if name in b.systems]
        values, need, lower = np.zeros(G), np.zeros(G), 0.0
        for i in has:
            v, lo, nd = blocks[i].systems[name]
            values[maps[i]] = v
            np.maximum.at(need, maps[i], nd)
            lower = min(lower, lo)
        As = None if len(has) == len(blocks) else stack([blocks[i].A for i in has], [maps[i] for i in has], G)
        systems.append(System(name, values, lower, need, As))
    scope = None
    if any(b.released for b in blocks):
        scope = np.zeros(G, dtype=bool)
        for b, m in zip(blocks, maps):
            if not b.released:
                scope[m] = True
    suppressed, audit = protect(A, primary, systems, depth, max_rounds=max_rounds, order=order, locked=locked,
                                max_lps=max_lps, scope=scope)
    audit.joint_with = tuple(b.name for b in blocks)
    return [suppressed[m] for m in maps], audit


def cell_labels(frame, columns: list[str], aliases: dict[tuple[str, str], tuple[str, str]] | None = None) -> np.ndarray:
    """Each cell's categories as one string, ``Total`` levels left out, in a fixed order.

    ``aliases`` maps a (column, category) to the one it is by definition (``fsm_years_band =
    0`` is ``fsm_ever = no``), so two tables' definitionally equal cells get the same label.

    Example:
        >>> import pandas as pd
        >>> f = pd.DataFrame({"la": ["E1", "Total"], "fsm_years_band": ["0", "Total"]})
        >>> cell_labels(f, ["la", "fsm_years_band"], {("fsm_years_band", "0"): ("fsm_ever", "no")}).tolist()
        ['fsm_ever=no|la=E1', '']
    """
    aliases = aliases or {}
    out = []
    for row in frame[columns].itertuples(index=False, name=None):
        parts = []
        for c, v in zip(columns, row):
            if v != TOTAL:
                c, v = aliases.get((c, v), (c, v))
                parts.append(f"{c}={v}")
        out.append("|".join(sorted(parts)))
    return np.array(out, dtype=object)
