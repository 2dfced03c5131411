"""An exact direct solve of the 5-point variable-coefficient operator -div(c grad .) on an n x n grid.

Multifrontal elimination in a geometric nested-dissection order (halve the grid by a separator line,
recursively; eliminate the halves, then the separator). The fronts of one tree depth are dense and
alike, so each group of them is one batched LU (partial pivoting within a separator) and one
batched product in numpy, on one BLAS thread; A's symmetry spares each front its D-by-E block.
At K = 421 that is about 0.45 s per solve where SuperLU factorising the same matrix in the
same order without pivoting (this module's previous solver; SuperLU's best built-in ordering was
slower still) takes 0.9 s: medians of interleaved runs, one core each, on a busy 2-core machine.
u equals SuperLU's pivoted ``spsolve`` to ~1e-13 relative L2 (``scripts/bench_darcy.py``). If a
separator block is singular or the residual is off (the splined coefficient can go negative, so
A need not be SPD), SuperLU with partial pivoting takes over.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla


def _dissection_tree(n: int, leaf: int = 4) -> list:
    """The geometric nested-dissection tree of an n x n grid (row-major ids), children before parents.

    A box is halved across its longer side by a one-point-wide separator line until it has at most
    ``leaf * leaf`` points or is thinner than 3. Each node is ``(E, D, depth, kids)``: ``E`` the ids it
    eliminates (its separator, or all of a leaf box, in row-major order), ``D`` the ids just outside
    its box (top, bottom, left, right side; all lie on ancestors' separators, the domain edge adds
    none), ``depth`` its distance from the root and ``kids`` the indices of its children.
    """
    nodes: list = []

    def rec(r0: int, r1: int, c0: int, c1: int, depth: int) -> Optional[int]:
        h, w = r1 - r0, c1 - c0
        if h <= 0 or w <= 0:
            return None
        if h * w <= leaf * leaf or min(h, w) < 3:
            kids = []
            E = (np.arange(r0, r1)[:, None] * n + np.arange(c0, c1)[None, :]).ravel()
        elif h >= w:
            m = (r0 + r1) // 2
            kids = [rec(r0, m, c0, c1, depth + 1), rec(m + 1, r1, c0, c1, depth + 1)]
            E = m * n + np.arange(c0, c1)
        else:
            m = (c0 + c1) // 2
            kids = [rec(r0, r1, c0, m, depth + 1), rec(r0, r1, m + 1, c1, depth + 1)]
            E = np.arange(r0, r1) * n + m
        D = [side for ok, side in ((r0 > 0, (r0 - 1) * n + np.arange(c0, c1)), (r1 < n, r1 * n + np.arange(c0, c1)),
                                   (c0 > 0, np.arange(r0, r1) * n + c0 - 1), (c1 < n, np.arange(r0, r1) * n + c1)) if ok]
        nodes.append((E, np.concatenate(D) if D else np.zeros(0, np.int64), depth, [k for k in kids if k is not None]))
        return len(nodes) - 1

    rec(0, n, 0, n, 0)
    return nodes


def nested_dissection(n: int, leaf: int = 4) -> np.ndarray:
    """Geometric nested-dissection order of an n x n grid (row-major ids): halves first, separator last."""
    return np.concatenate([node[0] for node in _dissection_tree(n, leaf)])


@functools.lru_cache(maxsize=8)
def elimination_order(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """(order, rank): ``order[new] = old`` grid id, ``rank[old] = new``; cached per grid size."""
    order = nested_dissection(n)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return order, rank


def stencil(coef_nodes: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 5-point operator of -div(c grad .) on the interior nodes, as solve_gwf.m builds it.

    Face coefficients are node averages ``(c_ij + c_nb) / 2``; everything is scaled by ``(K-1)^2``.

    Returns:
        diag ``[n, n]``; east ``[n, n-1]``: face between (i, j) and (i, j+1); south ``[n-1, n]``:
        face between (i, j) and (i+1, j). The off-diagonal entries of the matrix are ``-east``/``-south``.
    """
    K = coef_nodes.shape[0]
    c = coef_nodes
    ci = c[1:-1, 1:-1]
    east = (ci + c[1:-1, 2:]) / 2
    west = (ci + c[1:-1, :-2]) / 2
    south = (ci + c[2:, 1:-1]) / 2
    north = (ci + c[:-2, 1:-1]) / 2
    scale = (K - 1) ** 2
    return (east + west + south + north) * scale, east[:, :-1] * scale, south[:-1, :] * scale


def apply_stencil(diag: np.ndarray, east: np.ndarray, south: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``A @ x`` for the operator of :func:`stencil`, with ``x`` and the result as ``[n, n]`` grids."""
    y = diag * x
    y[:, :-1] -= east * x[:, 1:]
    y[:, 1:] -= east * x[:, :-1]
    y[:-1, :] -= south * x[1:, :]
    y[1:, :] -= south * x[:-1, :]
    return y


def assemble_operator(coef_nodes: np.ndarray) -> sp.csc_matrix:
    """The operator of :func:`stencil` as a sparse matrix, unknowns numbered in nested-dissection
    order (see :func:`elimination_order`). Used by the fallback solve and by ``scripts/bench_darcy.py``.

    Args:
        coef_nodes: ``[K, K]`` coefficient on the nodes ``linspace(0, 1, K)``.

    Returns:
        A: ``[(K-2)^2, (K-2)^2]`` CSC matrix.
    """
    n = coef_nodes.shape[0] - 2
    diag, east, south = stencil(coef_nodes)
    idx = elimination_order(n)[1].reshape(n, n)
    left, right, up, down = idx[:, :-1].ravel(), idx[:, 1:].ravel(), idx[:-1, :].ravel(), idx[1:, :].ravel()
    rows = np.concatenate([idx.ravel(), left, right, up, down])
    cols = np.concatenate([idx.ravel(), right, left, down, up])
    vals = np.concatenate([diag.ravel(), -east.ravel(), -east.ravel(), -south.ravel(), -south.ravel()])
    return sp.csc_matrix((vals, (rows, cols)), shape=(n * n, n * n))


# Multifrontal elimination. Every node of the dissection tree owns a dense "front" on the points
# [E, D]: the matrix entries first eliminated there, plus what its two children left on their own D
# after eliminating their E (Schur complements, "updates"). The node eliminates E and leaves an
# update on D for its parent. A is symmetric, so a front keeps only its E rows (the D-by-E block is
# their transpose) and the update is built straight from them. The right-hand side rides along as
# one extra column, so the upward sweep factorises and forward-substitutes at once; a downward
# sweep back-substitutes. Nodes of one depth with the same sizes and the same child layout form a
# group, eliminated together by one batched dense solve and one batched matmul.
@dataclass(frozen=True)
class _FrontGroup:
    s: int  # points eliminated per front (|E|)
    m: int  # points left to the parent (|D|)
    E: np.ndarray  # [B, s] grid ids
    D: np.ndarray  # [B, m] grid ids
    asm_pos: np.ndarray  # flat positions in the [B, s, s+m+1] E rows of the entries first eliminated here
    asm_src: np.ndarray  # ... and their indices in concat(diag, -east, -south)
    kids: tuple  # per child: (child group, child rows: slice or index array, E-row blocks, D-row blocks)
    release: tuple  # child groups whose updates are no longer needed after this group


def _runs(pos: np.ndarray, split: int) -> tuple:
    """``pos`` as maximal runs of consecutive integers, none crossing ``split``: ``((start in pos, value, length), ...)``."""
    cut = np.flatnonzero((np.diff(pos) != 1) | (pos[1:] == split)) + 1
    starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [pos.size]])
    return tuple((int(a), int(pos[a]), int(b - a)) for a, b in zip(starts, ends))


def _blocks(runs: tuple, s: int) -> Tuple[tuple, tuple]:
    """Slices that add a child's update (on its D, mapped to front positions by ``runs``) into the
    parent: rows in E go to the E rows (every column), rows in D to the parent's update (D columns)."""
    to_e, to_d = [], []
    for ca, fa, la in runs:
        rc = slice(ca, ca + la)
        if fa < s:
            to_e += [(rc, slice(cb, cb + lb), slice(fa, fa + la), slice(fb, fb + lb)) for cb, fb, lb in runs]
            to_e.append((rc, -1, slice(fa, fa + la), -1))
        else:
            to_d += [(rc, slice(cb, cb + lb), slice(fa - s, fa - s + la), slice(fb - s, fb - s + lb))
                     for cb, fb, lb in runs if fb >= s]
            to_d.append((rc, -1, slice(fa - s, fa - s + la), -1))
    return tuple(to_e), tuple(to_d)


@functools.lru_cache(maxsize=4)
def _frontal_plan(n: int) -> Tuple[_FrontGroup, ...]:
    """The groups of fronts of an n x n grid in elimination order (deepest first); cached per size.

    Each side of a child's D lies on its parent's separator or on one side of the parent's D, a
    contiguous run of the parent's front, so adding an update is a few rectangular slices; grouping
    by those runs makes them the same for every front of a group.
    """
    nodes = _dissection_tree(n)
    N = n * n
    depth = np.array([node[2] for node in nodes])
    node_of = np.empty(N, np.int64)
    for t, (E, _, _, _) in enumerate(nodes):
        node_of[E] = t
    where = np.full(N, -1, np.int64)  # scratch: grid id -> position in the current front
    keys: Dict[tuple, int] = {}
    members: list = []  # node indices per group
    layouts: list = []  # per group: (child group, runs) per child
    group_of = np.empty(len(nodes), np.int64)
    row_of = np.empty(len(nodes), np.int64)
    for t in sorted(range(len(nodes)), key=lambda t: -depth[t]):  # a child's group exists before its parent's
        E, D, d, kids = nodes[t]
        front = np.concatenate([E, D])
        where[front] = np.arange(front.size)
        layout = []
        for c in kids:
            pos = where[nodes[c][1]]
            assert (pos >= 0).all(), "a child's boundary must lie in its parent's front"
            layout.append((int(group_of[c]), _runs(pos, E.size)))
        where[front] = -1
        key = (d, E.size, D.size, tuple(layout))
        if key not in keys:
            keys[key] = len(members)
            members.append([])
            layouts.append(layout)
        group_of[t], row_of[t] = keys[key], len(members[keys[key]])
        members[keys[key]].append(t)

    # Each off-diagonal entry (p, q) goes to the front of whichever end is eliminated first (the deeper one).
    i, j = np.divmod(np.arange(N), n)
    p_e, p_s = (i * n + j)[j < n - 1], (i * n + j)[i < n - 1]
    p, q = np.concatenate([p_e, p_s]), np.concatenate([p_e + 1, p_s + n])
    src = N + np.arange(p.size)  # concat(diag, -east, -south) lists east row-major, then south row-major
    owner = np.where(depth[node_of[p]] >= depth[node_of[q]], node_of[p], node_of[q])
    by_owner = np.argsort(owner, kind="stable")
    p, q, src = p[by_owner], q[by_owner], src[by_owner]
    bounds = np.searchsorted(owner[by_owner], np.arange(len(nodes) + 1))

    last_use: Dict[int, int] = {}
    for g, ts in enumerate(members):
        for c in nodes[ts[0]][3]:
            last_use[int(group_of[c])] = g
    groups = []
    for g, ts in enumerate(members):
        s, m = nodes[ts[0]][0].size, nodes[ts[0]][1].size
        pos, srcs = [], []
        for b, t in enumerate(ts):
            E, D = nodes[t][0], nodes[t][1]
            front = np.concatenate([E, D])
            where[front] = np.arange(front.size)
            a, z = bounds[t], bounds[t + 1]
            pp, qq, ee = where[p[a:z]], where[q[a:z]], where[E]
            assert (pp >= 0).all() and (qq >= 0).all(), "a matrix entry must lie in the front that eliminates it"
            rows, cols = np.concatenate([ee, pp, qq]), np.concatenate([ee, qq, pp])
            keep = rows < s  # the E rows; entries in D rows are their transposes
            pos.append((b * s + rows[keep]) * (s + m + 1) + cols[keep])
            srcs.append(np.concatenate([E, src[a:z], src[a:z]])[keep])
            where[front] = -1
        kids = []
        for k, (cg, runs) in enumerate(layouts[g]):
            rows = np.array([row_of[nodes[t][3][k]] for t in ts])  # each front's child, as a row of the child group
            if rows.size == len(members[cg]) and np.array_equal(rows, np.arange(rows.size)):
                rows = slice(None)
            kids.append((cg, rows, *_blocks(runs, s)))
        groups.append(_FrontGroup(
            s=s, m=m, E=np.stack([nodes[t][0] for t in ts]), D=np.stack([nodes[t][1] for t in ts]),
            asm_pos=np.concatenate(pos), asm_src=np.concatenate(srcs), kids=tuple(kids),
            release=tuple(sorted(cg for cg, last in last_use.items() if last == g))))
    return tuple(groups)


def multifrontal_solve(diag: np.ndarray, east: np.ndarray, south: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``A x = b`` for the operator of :func:`stencil` by multifrontal elimination (exact).

    Pivoting is partial within each separator block only, so a singular block raises
    ``np.linalg.LinAlgError``; the caller checks the residual either way.

    Args:
        diag, east, south: from :func:`stencil`.
        b: ``[n, n]`` right-hand side on the interior nodes.

    Returns:
        x: ``[n, n]``.
    """
    n = diag.shape[0]
    vals = np.concatenate([diag.ravel(), -east.ravel(), -south.ravel()])
    b = b.ravel()
    groups = _frontal_plan(n)
    updates: Dict[int, np.ndarray] = {}  # group -> [B, m, m+1]: Schur complement on D | reduced rhs
    solved = []
    for g, grp in enumerate(groups):
        s, m = grp.s, grp.m
        F = np.zeros((grp.E.shape[0], s, s + m + 1))  # E rows of the fronts: [E | D | rhs] columns
        F.reshape(-1)[grp.asm_pos] = vals[grp.asm_src]
        F[:, :, -1] = b[grp.E]
        kids = [(updates[cg][rows], to_e, to_d) for cg, rows, to_e, to_d in grp.kids]
        for U, to_e, _ in kids:
            for rc, cc, rf, cf in to_e:
                F[:, rf, cf] += U[:, rc, cc]
        Y = np.linalg.solve(F[:, :, :s], F[:, :, s:])  # E^-1 [D coupling | rhs]
        solved.append(Y)
        if m:
            FD = F[:, :, s:-1]
            np.negative(FD, out=FD)
            V = FD.transpose(0, 2, 1) @ Y  # -(D-by-E block) E^-1 [D coupling | rhs]
            for U, _, to_d in kids:
                for rc, cc, rf, cf in to_d:
                    V[:, rf, cf] += U[:, rc, cc]
            updates[g] = V
        for cg in grp.release:
            del updates[cg]
    x = np.empty(n * n)
    for grp, Y in zip(reversed(groups), reversed(solved)):
        x[grp.E] = Y[:, :, -1] - (Y[:, :, :-1] @ x[grp.D][:, :, None])[:, :, 0] if grp.m else Y[:, :, -1]
    return x.reshape(n, n)


def solve_interior(coef_nodes: np.ndarray, f_interior: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """Exact solve on the interior nodes, checked by its residual.

    Why a check: the spline overshoots at sharp interfaces (node coefficients down to about -2.5
    for a in {3, 12}), so A is not guaranteed SPD; if a separator block is singular or the
    residual is off, SuperLU with partial pivoting takes over.
    """
    diag, east, south = stencil(coef_nodes)
    try:
        x = multifrontal_solve(diag, east, south, f_interior)
        if np.linalg.norm(apply_stencil(diag, east, south, x) - f_interior) <= rtol * np.linalg.norm(f_interior):
            return x
    except np.linalg.LinAlgError:
        pass
    n = diag.shape[0]
    order, rank = elimination_order(n)
    x = spla.splu(assemble_operator(coef_nodes), permc_spec="MMD_AT_PLUS_A").solve(f_interior.ravel()[order])
    return x[rank].reshape(n, n)
