"""A sweep as a Slurm job array: one array task per grid point (or per pack of points), resumable.

    bash scripts/sweep.sh configs/experiments/ranks_patches.yaml --slurm              # write the sbatch script
    bash scripts/sweep.sh configs/experiments/ranks_patches.yaml --slurm --submit \\
        --sbatch "--partition=gpu --gres=gpu:1 --cpus-per-task=8 --time=02:00:00"   # and submit it

Why an array whose tasks call the sweep back, instead of one ``stage3`` command per task: each task
runs ``python -m orca sweep SWEEP.yaml --only NAME[,NAME...]``, so a task goes through the sweep's
own machinery (the same resolved configs, ``sweep.json``, resume from ``ckpt/last.pt``, packing
with ``--pack``) and skips a run whose ``summary.json`` exists. The script lists only the runs that
were unfinished when it was written; regenerating it after a partial array (time limit, preemption,
a failed node) lists what is still missing, and resubmitting an old script redoes nothing that
finished in the meantime.

The task list is written into the script rather than read from a side file at run time, because
Slurm copies the script at submission: a queued array keeps running exactly what it was given even
after the file is regenerated. Tasks that generate a disk-cached dataset (Darcy) write it through
atomic renames, so array tasks that start on an empty cache only repeat each other's work;
``python -m orca data --config ...`` on the login node beforehand avoids even that.

``bash scripts/sweep.sh ... --slurm`` comes here (``python -m orca slurm``); ``orca.sweep`` knows
nothing of Slurm beyond ``--only``.
"""
from __future__ import annotations

import argparse
import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Type

from orca.config import ExperimentConfig
from orca.errors import OrcaError, UsageError, exit_on_error
from orca.runs import REPO_ROOT
from orca.sweep import add_pool_arguments, check_ownership, check_pool_arguments, load_sweep

#: Array tasks that may run at once unless ``--array-limit`` says otherwise (Slurm's ``%N`` throttle).
DEFAULT_ARRAY_LIMIT = 16


def chunk(names: Sequence[str], size: int) -> List[List[str]]:
    """Consecutive groups of ``size`` run names (the last may be shorter): one group per array task."""
    if size < 1:
        raise ValueError(f"runs per array task must be >= 1, got {size}")
    return [list(names[i:i + size]) for i in range(0, len(names), size)]


def sbatch_lines(sbatch_args: str) -> List[str]:
    """``"--partition=gpu -t 2:00:00 --gres=gpu:1"`` -> one ``#SBATCH`` line per option (a value
    given as the next word stays on its option's line).

    Raises:
        UsageError: a word that is not an option and follows no option, or an option the script sets itself.
    """
    try:
        words = shlex.split(sbatch_args)
    except ValueError as err:
        raise UsageError(f"--sbatch {sbatch_args!r} does not parse ({err})", None,
                         'quote it as one argument, e.g. --sbatch "--partition=gpu --gres=gpu:1"') from None
    lines: List[List[str]] = []
    for word in words:
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            if option in ("--array", "-a", "--output", "-o", "--error", "-e", "--chdir", "-D", "--job-name", "-J"):
                raise UsageError(f"--sbatch sets {option}, which the array script sets itself", None,
                                 "use --array-limit for the throttle and drop the others")
            lines.append([word])
        elif lines and len(lines[-1]) == 1 and "=" not in lines[-1][0] and lines[-1][0].startswith("-"):
            lines[-1].append(word)
        else:
            raise UsageError(f"--sbatch: {word!r} follows no option", None,
                             'give sbatch options only, e.g. --sbatch "--partition=gpu --time=02:00:00"')
    return ["#SBATCH " + " ".join(shlex.quote(w) for w in line) for line in lines]


def array_script(tasks: Sequence[Sequence[str]], command: Sequence[str], *, job_name: str, log_dir: Path,
                 workdir: Path, python: str, pythonpath: str, array_limit: int = DEFAULT_ARRAY_LIMIT,
                 sbatch_args: str = "", header: str = "") -> str:
    """The text of an sbatch job-array script.

    Args:
        tasks: run names per array task (task ``i`` gets ``tasks[i]``).
        command: the task's command after the interpreter (``-m orca sweep SWEEP.yaml [overrides]``);
            ``--only NAME,...`` is appended per task.
        job_name: Slurm job name.
        log_dir: where ``%A_%a.log`` (array job id, task index) goes, one log per task.
        workdir: the directory the task starts in (relative paths in configs mean what they meant here).
        python: the interpreter; ``ORCA_PYTHON`` set in the job's environment overrides it.
        pythonpath: prepended to ``PYTHONPATH`` (the repository root).
        array_limit: at most this many tasks at once (``--array=0-N%limit``).
        sbatch_args: further sbatch options (partition, GPUs, time), one string.
        header: comment lines on what the script is (without ``#``).
    """
    if not tasks:
        raise ValueError("an array script needs at least one task")
    if array_limit < 1:
        raise UsageError(f"--array-limit must be >= 1, got {array_limit}")
    q = shlex.quote
    lines = ["#!/bin/bash", *(f"# {line}".rstrip() for line in header.splitlines()),
             f"#SBATCH --job-name={q(job_name)}",
             f"#SBATCH --array=0-{len(tasks) - 1}%{min(array_limit, len(tasks))}",
             f"#SBATCH --output={q(str(log_dir / '%A_%a.log'))}",
             f"#SBATCH --chdir={q(str(workdir))}",
             *sbatch_lines(sbatch_args),
             "set -euo pipefail",
             "# the runs of each array task, by index",
             "TASKS=(",
             *(f"  {q(','.join(names))}" for names in tasks),
             ")",
             f"export PYTHONPATH={q(pythonpath)}${{PYTHONPATH:+:$PYTHONPATH}} PYTHONUNBUFFERED=1",
             'echo "[slurm] task ${SLURM_ARRAY_TASK_ID} on $(hostname): ${TASKS[$SLURM_ARRAY_TASK_ID]}"',
             f'exec "${{ORCA_PYTHON:-{python}}}" ' + " ".join(q(c) for c in command)
             + ' --only "${TASKS[$SLURM_ARRAY_TASK_ID]}"']
    return "\n".join(lines) + "\n"


def _slurm_command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise OrcaError(f"{name} not found on PATH", None,
                        "submit from a Slurm login node (or write the script without --submit and sbatch it there)")
    return path


def queued_jobs(script: Path) -> List[str]:
    """Ids of this user's jobs submitted from ``script`` that are still pending or running (empty if none)."""
    out = subprocess.run([_slurm_command("squeue"), "-h", "-u", _user(), "-o", "%A %o"], capture_output=True, text=True)
    if out.returncode != 0:
        raise OrcaError(f"squeue failed: {out.stderr.strip() or out.stdout.strip()}", None,
                        "check that Slurm answers (scontrol ping)")
    target = os.path.realpath(script)
    return sorted({job for job, _, command in (line.partition(" ") for line in out.stdout.splitlines())
                   if command and os.path.realpath(command.strip()) == target})


def _user() -> str:
    return os.environ.get("USER") or getpass.getuser()


def submit(script: Path) -> str:
    """``sbatch`` the script; the array job's id.

    Raises:
        OrcaError: sbatch missing or refusing, or an array from the same script (the same sweep and
            output directory) still in the queue: its tasks would train the same unfinished runs
            twice, into the same directories.
    """
    running = queued_jobs(script)
    if running:
        raise OrcaError(f"array job {', '.join(running)} from {script} is still queued or running", None,
                        f"wait for it (squeue -j {running[0]}) or scancel it, then submit again")
    out = subprocess.run([_slurm_command("sbatch"), "--parsable", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise OrcaError(f"sbatch refused {script}: {out.stderr.strip() or out.stdout.strip()}", None,
                        "fix the options given with --sbatch (partition, time, GPUs) and submit again")
    job_id = out.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    if not re.fullmatch(r"\d+", job_id):
        raise OrcaError(f"sbatch answered {out.stdout.strip()!r} instead of a job id", str(script), None)
    return job_id


def write_script(path: Path, text: str) -> Path:
    """Write the script executable (``bash script`` and ``sbatch script`` both work)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path



def slurm_sweep(path: str | os.PathLike, overrides: Sequence[str] = (), *, runs_per_task: int = 1,
                task_flags: Sequence[str] = (), array_limit: int = DEFAULT_ARRAY_LIMIT, sbatch_args: str = "",
                submit_job: bool = False,
                schema: Type[ExperimentConfig] = ExperimentConfig) -> Tuple[Optional[Path], Optional[str]]:
    """Write the sweep's unfinished runs as a job array; with ``submit_job``, sbatch it.

    The script goes to ``{output_dir}/{table}/slurm/{sweep file stem}.sbatch``, one log per task under
    ``slurm/logs/``. Returns the script's path and the job id (``None, None`` when every run is done;
    the id is None without ``submit_job``).

    Args:
        path: the sweep YAML; overrides: as ``orca.sweep`` takes them (every task passes them on).
        runs_per_task: runs each array task trains (1; a pack's size; several runs per GPU).
        task_flags: sweep flags every task passes on (``--pack K``, ``--per-gpu K``, ``--gpus N``).
        array_limit: at most this many tasks at once; sbatch_args: further sbatch options.
        schema: the experiment schema of the runs' configs (as ``orca.sweep.load_sweep``).
    """
    spec, runs = load_sweep(path, overrides, schema)
    check_ownership(runs, str(path))
    pending = [r for r in runs if not r.done]
    where = Path(spec.output_dir) / spec.table
    print(f"[slurm] {path}: {len(runs)} runs in {where}, {len(runs) - len(pending)} done, {len(pending)} pending",
          flush=True)
    if not pending:
        print("[slurm] nothing to submit: every run has its summary.json", flush=True)
        return None, None
    tasks = chunk([run.name for run in pending], runs_per_task)
    stem = Path(path).stem
    job_name = f"orca-{stem}"
    log_dir = (where / "slurm" / "logs").resolve()
    command = ["-m", "orca", "sweep", str(path), *overrides, *task_flags]
    header = (f"{path}: the {len(pending)} unfinished of its {len(runs)} runs in {where}, {len(tasks)} array "
              f"task(s) of up to {runs_per_task} run(s),\nwritten {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by "
              f"`bash scripts/sweep.sh {path} --slurm`. A task skips runs finished since: sbatch this file\n"
              f"again, or regenerate it, to train what is still missing.")
    text = array_script(tasks, command, job_name=job_name, log_dir=log_dir, workdir=Path.cwd().resolve(),
                        python=sys.executable, pythonpath=str(REPO_ROOT), array_limit=array_limit,
                        sbatch_args=sbatch_args, header=header)
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    script = write_script(where / "slurm" / f"{stem}.sbatch", text)
    print(f"[slurm] wrote {script}: {len(tasks)} array task(s), at most {min(array_limit, len(tasks))} at once; "
          f"logs in {log_dir}", flush=True)
    if not submit_job:
        print(f"[slurm] submit it with: sbatch {script}", flush=True)
        return script, None
    job_id = submit(script)
    print(f"[slurm] submitted array job {job_id} ({job_name}); follow it with: squeue -j {job_id}", flush=True)
    return script, job_id


def _joined_sbatch(argv: Sequence[str]) -> List[str]:
    """``--sbatch VALUE`` -> ``--sbatch=VALUE``: argparse would read a value such as ``--time=1:00:00``
    (an option, no space) as a flag of its own and fail."""
    out, words = [], list(argv)
    while words:
        word = words.pop(0)
        out.append(f"--sbatch={words.pop(0)}" if word == "--sbatch" and words else word)
    return out


def main(argv: Optional[Sequence[str]] = None, schema: Type[ExperimentConfig] = ExperimentConfig) -> int:
    """``bash scripts/sweep.sh SWEEP.yaml --slurm ...`` (``python -m orca slurm``, which passes the full
    schema): a bad sweep file or ``--sbatch``, or sbatch missing or refusing, ends in one ``error:``
    line (exit 2 or 1), not a traceback."""
    return exit_on_error(lambda args: _main(args, schema), argv)


def _main(argv: List[str], schema: Type[ExperimentConfig]) -> int:
    parser = argparse.ArgumentParser(prog="bash scripts/sweep.sh SWEEP.yaml --slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pool_arguments(parser, gpus="each task's --gpus (default: the GPUs Slurm gives it; 0 = in the task's process)",
                       per_gpu="runs side by side on each of a task's GPUs",
                       pack="one array task per K runs, trained together through one shared body (orca.sweep --pack)")
    parser.add_argument("--submit", action="store_true", help="submit the array with sbatch (default: only write it)")
    parser.add_argument("--array-limit", type=int, default=DEFAULT_ARRAY_LIMIT, metavar="N",
                        help=f"at most N array tasks at once (default {DEFAULT_ARRAY_LIMIT})")
    parser.add_argument("--sbatch", default="", metavar="OPTIONS",
                        help='sbatch options for every task, e.g. "--partition=gpu --gres=gpu:1 --time=02:00:00"')
    args = parser.parse_intermixed_args(_joined_sbatch(argv))
    check_pool_arguments(parser, args)
    if args.array_limit < 1:
        parser.error(f"--array-limit must be >= 1, got {args.array_limit}")
    task_flags = ([f"--gpus={args.gpus}"] if args.gpus is not None else []) + \
                 ([f"--per-gpu={args.per_gpu}"] if args.per_gpu > 1 else []) + \
                 ([f"--pack={args.pack}"] if args.pack else [])
    slurm_sweep(args.sweep, args.overrides, runs_per_task=args.pack or max(1, args.gpus or 1) * args.per_gpu,
                task_flags=task_flags, array_limit=args.array_limit, sbatch_args=args.sbatch, submit_job=args.submit,
                schema=schema)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("error: write Slurm arrays with `bash scripts/sweep.sh SWEEP.yaml --slurm` (python -m orca slurm), "
             "which knows every stage's config sections")
