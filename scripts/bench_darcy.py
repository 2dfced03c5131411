"""Time the generation of ORCA's Darcy set (1,100 train-stream + 100 test samples, 421 -> 85) and
check that our solver matches a plain sparse direct solve.

    python scripts/bench_darcy.py                          # the full set, all cores (2 on CI-sized machines)
    python scripts/bench_darcy.py --n-train 20 --n-test 4  # a quick check

Why both: generation speed decides whether users regenerate the data or wait for files, and the
multifrontal solver (batched dense fronts in a nested-dissection order) is only worth having if it
gives the answer of the textbook solve. The check solves ``--check`` samples again with
``scipy.sparse.linalg.spsolve`` in its default ordering on the same assembled operator and reports
the largest relative L2 difference of u on the 421 grid (goal: <= 1e-6).

Writes ``results/bench/darcy.json`` and ``.md`` with the machine, git commit and command.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse.linalg as spla


from datasets.darcy import generate_darcy
from datasets.darcy_solver import CoefficientPrior, generate_sample, solve_darcy, spline_matrices
from datasets.multifrontal import assemble_operator, elimination_order
from orca.errors import exit_on_error
from orca.runs import git_info, machine_info, write_json


def reference_solve(coeff: np.ndarray) -> np.ndarray:
    """u on the cell centres by the same discretisation, solved by spsolve (SuperLU with its own
    fill-reducing ordering and partial pivoting) instead of our multifrontal elimination."""
    K = coeff.shape[0]
    to_nodes, to_centres = spline_matrices(K)
    coef_nodes = to_nodes @ coeff @ to_nodes.T
    f_nodes = to_nodes @ np.ones((K, K)) @ to_nodes.T
    order, rank = elimination_order(K - 2)  # assemble_operator numbers the unknowns in this order
    x = spla.spsolve(assemble_operator(coef_nodes), f_nodes[1:-1, 1:-1].ravel()[order])
    u_nodes = np.zeros((K, K))
    u_nodes[1:-1, 1:-1] = x[rank].reshape(K - 2, K - 2)
    return to_centres @ u_nodes @ to_centres.T


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=1100, help="train-stream samples (train + validation pool)")
    p.add_argument("--n-test", type=int, default=100, help="test-stream samples")
    p.add_argument("--resolution", type=int, default=421)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--check", type=int, default=3, help="samples re-solved with spsolve for the accuracy check")
    p.add_argument("--out", default="results/bench/darcy", help="output path stem (.json and .md)")
    args = p.parse_args(argv)

    cache = Path(tempfile.mkdtemp(prefix="bench_darcy_"))
    try:
        t0 = time.perf_counter()
        generate_darcy(args.n_train, cache, stream="train", resolution=args.resolution, workers=args.workers)
        generate_darcy(args.n_test, cache, stream="test", resolution=args.resolution, workers=args.workers)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    worst = 0.0
    for i in range(args.check):
        rng = np.random.default_rng([0, 0, i])  # the train stream's generator for sample i
        coeff = CoefficientPrior().sample(rng, args.resolution)
        ours, ref = solve_darcy(coeff), reference_solve(coeff)
        worst = max(worst, float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)))
        c85, _ = generate_sample(i, resolution=args.resolution)
        if not np.array_equal(c85, coeff[::5, ::5].astype(np.float32)):
            raise RuntimeError("bench_darcy: the reconstructed coefficient differs from generate_sample's; "
                               "the check would compare different problems")

    n = args.n_train + args.n_test
    result = {"samples": n, "resolution": args.resolution, "workers": args.workers, "seconds": seconds,
              "seconds_per_sample": seconds / n, "max_rel_l2_vs_spsolve": worst, "checked": args.check,
              "machine": machine_info(), "git": git_info(), "command": " ".join(["python", *sys.argv])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(
        f"# Darcy generation ({result['machine']['cpus']} CPUs, {args.workers} workers)\n\n"
        f"`{result['command']}` at commit {result['git']['commit']} (dirty: {result['git']['dirty']})\n\n"
        f"| samples | grid | wall time | per sample | max rel. L2 vs spsolve ({args.check} samples) |\n"
        f"|---|---|---|---|---|\n"
        f"| {n} | {args.resolution} -> {(args.resolution - 1) // 5 + 1} | {seconds / 60:.2f} min | "
        f"{seconds / n:.3f} s | {worst:.2e} |\n")
    print(json.dumps({k: result[k] for k in ("samples", "seconds", "seconds_per_sample", "max_rel_l2_vs_spsolve")}))
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
