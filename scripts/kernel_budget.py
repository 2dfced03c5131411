"""The ceiling of an adapter step's speed-up over full fine-tuning, from a bench_train.py profile.

    python scripts/kernel_budget.py results/bench/train_compile_sdpa_rank0_b256_profile.json --targets 1.3 1.2
    python scripts/kernel_budget.py P_profile.json --bench P.json --targets 1.3 1.5 --out results/bench/kernel_budget

Reads the ``*_profile.json`` kernel summary and the ``*.json`` of the same ``bench_train.py`` run
(by default: the profile's name without ``_profile``) and prices each profiled configuration
against full fine-tuning: if its GEMMs ran at the rate of full fine-tuning's GEMMs, FLOP for FLOP,
with its measured non-GEMM work, what img/s ratio could it reach, and how much GEMM time above
that may it keep for a target ratio (``orca/kernel_budget.py`` states the model).

Writes ``<out>.json`` and ``<out>.md`` (default ``results/bench/kernel_budget``) with both inputs'
machine and commit, and this analysis's command and commit. CPU only, seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from orca.errors import exit_on_error
from orca.kernel_budget import BudgetInputError, budget_markdown, kernel_budget
from orca.runs import git_info, write_json


def _load(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BudgetInputError(f"no {what} file {path}") from None
    except json.JSONDecodeError as e:
        raise BudgetInputError(f"{what} file {path} is not JSON: {e}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("profile", type=Path, help="a *_profile.json written by bench_train.py --profile")
    p.add_argument("--bench", type=Path, help="the same run's benchmark .json (default: the profile's name without _profile)")
    p.add_argument("--base", default="full", help="the configuration ratios are taken against")
    p.add_argument("--targets", type=float, nargs="+", default=[1.3], help="img/s ratios to price, e.g. 1.3 1.2")
    p.add_argument("--out", type=Path, default=Path("results/bench/kernel_budget"), help="output path stem")
    args = p.parse_args(argv)
    bench_path = args.bench or args.profile.with_name(args.profile.name.replace("_profile.json", ".json"))
    try:
        if bench_path == args.profile:
            raise BudgetInputError(f"{args.profile} does not end in _profile.json: pass --bench")
        profile, bench = _load(args.profile, "profile"), _load(bench_path, "benchmark")
        rows = kernel_budget(profile, bench, base=args.base, targets=args.targets)
    except BudgetInputError as e:
        print(f"kernel_budget: {e}", file=sys.stderr)
        return 2
    command = " ".join(["python", "scripts/kernel_budget.py", *(argv if argv is not None else sys.argv[1:])])
    result = {"command": command, "git": git_info(), "profile": str(args.profile), "bench": str(bench_path),
              "measured": {"machine": profile.get("machine"), "git": profile.get("git"),
                           "command": profile.get("command"), "date": profile.get("date")},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), result)
    m, table = profile.get("machine") or {}, budget_markdown(rows)
    args.out.with_suffix(".md").write_text(
        f"# Kernel budget: {', '.join(sorted({r['config'] for r in rows}))} against {args.base}\n\n"
        f"`{command}` at commit {result['git']['commit']}, from `{args.profile}` and `{bench_path}`, measured on "
        f"{m.get('gpu', 'an unknown machine')} at commit {(profile.get('git') or {}).get('commit', 'unknown')} "
        f"({profile.get('date', 'undated')}) by `{profile.get('command', '?')}`.\n\n"
        "Times are ms per step, device time summed over kernels. Ideal GEMM = the base's GEMM ms x the FLOP "
        "ratio (every GEMM FLOP at the base's GEMM rate); ceiling = base ms / (ideal GEMM + non-GEMM); excess "
        "allowed = the GEMM time above ideal a step may keep and still reach the target (negative: out of reach "
        "even at zero). The model: `orca/kernel_budget.py`.\n\n" + table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
