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

* every suppressed cell's interval must be at least ``P`` wide;
* a primary (sensitive) cell's interval must also reach ``P`` above its true value and
  ``P`` below it, or down to the a-priori bound (the upper and lower protection levels of
  tau-Argus), so the adversary cannot pin it near either end.

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

log = logging.getLogger(__name__)


@dataclass
class System:
    """One additive measure over the table's cells, as the adversary's LP sees it.

    Fields:
        name: ``count`` or the magnitude column's name (for the report).
        values: the true value of every cell (never written anywhere).
        lower: the a-priori lower bound of every cell (0, or -inf for signed values).
        need: the protection ``P`` a cell needs when it is suppressed.
    """

    name: str
    values: np.ndarray
    lower: float
    need: np.ndarray


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
    """

    rounds: int = 0
    lps: int = 0
    secondary: int = 0
    audited: dict[str, int] = field(default_factory=dict)
    protected: bool = True
    fallback: bool = False


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


def _components(A: sparse.csr_matrix, cols: np.ndarray) -> list[np.ndarray]:
    B = A[:, cols]
    B = B[np.asarray((B != 0).sum(axis=1)).ravel() > 0]
    adj = (abs(B).T @ abs(B)).tocsr()
    k, labels = connected_components(adj, directed=False)
    return [cols[labels == i] for i in range(k)]


class _Model:
    """One component's equations ``Ac @ x = b`` as a HiGHS model; each solve sets only costs and bounds."""

    def __init__(self, Ac: sparse.csr_matrix, b: np.ndarray):
        self.n = Ac.shape[1]
        self.idx = np.arange(self.n, dtype=np.int32)
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
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

    def __init__(self, A: sparse.csr_matrix, system: System, primary: np.ndarray):
        self.A = A
        self.s = system
        self.primary = primary
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
        """Whether each cell meets its requirement on one side (for a secondary cell: its width)."""
        up, down = self.targets(cols)
        tol = self._tol(cols)
        width_ok = self.hi[cols] - self.lo[cols] >= self.s.need[cols] - tol
        side_ok = self.hi[cols] >= up - tol if direction == "up" else self.lo[cols] <= down + tol
        prim = self.primary[cols]
        return np.where(prim, side_ok, width_ok | side_ok)

    def _solve(self, model: _Model, cols, obj, bounds):
        self.lps += 1
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
        cols_all = np.flatnonzero(suppressed)
        if not len(cols_all):
            return failures
        for cols in _components(self.A, cols_all):
            if self.satisfied(cols, "up").all() and self.satisfied(cols, "down").all():
                continue
            rows = np.flatnonzero(np.asarray((self.A[:, cols] != 0).sum(axis=1)).ravel() > 0)
            Ac = self.A[rows][:, cols]
            model = _Model(Ac, Ac @ self.s.values[cols])
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
                if not self.primary[c]:
                    short = self.s.need[c] - (self.hi[c] - self.lo[c])
                    failures.append((c, "up", float(short)))
                elif not up_ok[i]:
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

    def all_satisfied(self, suppressed: np.ndarray) -> bool:
        """Whether every suppressed cell meets its requirement on both sides."""
        cols = np.flatnonzero(suppressed)
        return bool(self.satisfied(cols, "up").all() and self.satisfied(cols, "down").all())


def _partner(A: sparse.csr_matrix, csc: sparse.csc_matrix, cell: int, suppressed: np.ndarray, amount: float,
             values: np.ndarray, depth: np.ndarray, rows: np.ndarray | None = None) -> int | None:
    # the cheapest unsuppressed cell sharing an equation with `cell`: one that can absorb
    # `amount`, then at the finest level, then the smallest
    eq_rows = csc.indices[csc.indptr[cell]:csc.indptr[cell + 1]] if rows is None else rows
    cand: set[int] = set()
    for r in eq_rows:
        cand.update(int(j) for j in A.indices[A.indptr[r]:A.indptr[r + 1]])
    cand = [j for j in cand if not suppressed[j]]
    if not cand:
        return None
    return min(cand, key=lambda j: (values[j] < amount, depth[j], values[j], j))


def protect(A: sparse.csr_matrix, primary: np.ndarray, systems: list[System], depth: np.ndarray,
            max_rounds: int = 200) -> tuple[np.ndarray, Audit]:
    """Choose secondary suppressions so that every suppressed cell is protected in every system.

    Args:
        A: the margin equations (:func:`equations`).
        primary: cells suppressed by the primary rules.
        systems: the additive measures to protect (the count first).
        depth: per cell, how many dimension levels are margins (finer cells are preferred).
        max_rounds: after this many rounds every cell is suppressed (a safe fallback).

    Returns:
        (suppressed mask, :class:`Audit`). Secondary cells are ``suppressed & ~primary``.

    Example:
        >>> nodes = [[("Total",), ("a",), ("b",)]]            # a + b = Total
        >>> A = equations(nodes)
        >>> counts = np.array([20.0, 3.0, 17.0])
        >>> s = System("count", counts, 0.0, np.maximum(5, 0.1 * counts))
        >>> mask, audit = protect(A, np.array([False, True, False]), [s], np.array([1, 0, 0]))
        >>> mask.tolist()                                     # b (17) protects a: a, b in [0, 20]
        [False, True, True]
    """
    suppressed = primary.copy()
    audit = Audit()
    if not suppressed.any() or A.shape[0] == 0:
        return suppressed, audit
    count = systems[0]
    auditors = [_Auditor(A, s, primary) for s in systems]
    csc = A.tocsc()
    for rnd in range(1, max_rounds + 1):
        audit.rounds = rnd
        _closure(A, csc, suppressed, count, depth)
        failures = []
        for aud in auditors:
            failures += [(c, d, short, aud.s) for c, d, short in aud.audit(suppressed)]
        if not failures:
            break
        added = set()
        for c, direction, short, system in failures:
            # a cell that must rise needs a partner that can fall by the shortfall, and vice versa
            amount = short if direction == "up" else 0.0
            j = _partner(A, csc, c, suppressed, amount, system.values, depth)
            if j is None:   # its equations are all suppressed: widen through any neighbour of its component
                j = _any_neighbour(A, csc, suppressed, system.values, depth)
            if j is not None:
                added.add(j)
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
    audit.lps = sum(a.lps for a in auditors)
    audit.secondary = int((suppressed & ~primary).sum())
    audit.audited = {a.s.name: int(suppressed.sum()) for a in auditors}
    audit.protected = audit.fallback or all(a.all_satisfied(suppressed) for a in auditors)
    return suppressed, audit


def _closure(A: sparse.csr_matrix, csc: sparse.csc_matrix, suppressed: np.ndarray, count: System,
             depth: np.ndarray) -> None:
    # no equation may hold exactly one suppressed cell: it would be its margin minus the rest
    while True:
        S = sparse.diags(suppressed.astype(float))
        per_row = np.asarray((abs(A) @ S).sum(axis=1)).ravel()
        single = np.flatnonzero(per_row == 1)
        if not len(single):
            return
        for r in single:
            cells = A.indices[A.indptr[r]:A.indptr[r + 1]]
            if suppressed[cells].sum() != 1:
                continue   # an earlier pick in this pass already fixed it
            c = int(cells[suppressed[cells]][0])
            j = _partner(A, csc, c, suppressed, count.need[c], count.values, depth, rows=np.array([r]))
            if j is not None:
                suppressed[j] = True


def _any_neighbour(A, csc, suppressed, values, depth) -> int | None:
    touched = np.asarray((abs(A) @ sparse.diags(suppressed.astype(float))).sum(axis=1)).ravel() > 0
    cand = np.unique(A[touched].indices)
    cand = [int(j) for j in cand if not suppressed[j]]
    if not cand:
        return None
    return min(cand, key=lambda j: (depth[j], -values[j], j))
