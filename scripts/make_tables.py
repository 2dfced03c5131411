"""Regenerate the seed's Tables 1-4 from stage-3 run summaries: results/tables.md and results/tables.tex.

    bash scripts/make_tables.sh                                   # results/runs -> results/tables.{md,tex}
    python scripts/make_tables.py --root results/runs --out results/tables.md
    python scripts/make_tables.py --check                         # exit 1 if results/tables.md is stale

No number in the output is typed by hand: ours come from ``summary.json`` files (grouped by the
``sweep.json`` that ``orca/sweep.py`` writes next to them: table tag and row), the seed's from the
seed's tables (``seed_tables.json``). Every row keeps the seed's rows in the seed's order, so a row
we did not run reads "no runs" instead of vanishing; rows we ran that the seed lacks come after.
Each of our cells links to a run directory: the parameter count to the row's first run, and every
per-seed error in the "runs" column to its own run; the mean +- std is computed from exactly those.

The output is a pure function of the summaries and the reference file (sorted inputs, fixed
formatting, relative links, no dates), so running it twice -- or on a fresh clone with the same
committed summaries -- gives byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from orca.errors import exit_on_error

REPO = Path(__file__).resolve().parents[1]
#: Where the seed's numbers are looked for when --reference is not given (first existing wins):
#: a copy inside the repository, then the project's shared reference folder next to the checkout.
REFERENCE_CANDIDATES = (REPO / "results/reference/seed_tables.json",
                        Path(__file__).resolve().parents[2] / "shared/reference/seed_tables.json")
TABLE_TAGS = ("table1", "table2", "table3", "table4")
#: Which seed row our full fine-tuning matches. Table 1's "ORCA (50 epochs)" is full fine-tuning for the
#: same epochs as its LoRA row; Table 4's "ORCA" is full fine-tuning after OTDD alignment (our Table 4
#: full runs load the aligned embedder). Elsewhere the seed calls it "Fine-tune".
FULL_ROW = {"table1": "ORCA (50 epochs)", "table4": "ORCA"}
_NAMED_KEYS = ("adapter.method", "adapter.rank", "seed")


@dataclass
class Run:
    """One stage-3 run as the tables need it."""

    path: Path
    table: str
    row: str
    method: str
    rank: Optional[int]
    extras: Dict[str, Any]
    seed: int
    epochs: int
    metric: str
    error: float
    trainable: int
    adapters: int
    task: str
    body: str
    weights: str
    body_params: int


@dataclass
class Row:
    """Our runs of one table row (same grid point, different seeds)."""

    key: str
    runs: List[Run] = field(default_factory=list)

    @property
    def first(self) -> Run:
        return self.runs[0]

    def label(self) -> str:
        r = self.first
        if r.method == "full":
            text = "Fine-tune"
        elif r.method == "head":
            text = "Embedder + head only"
        elif r.rank is None:
            text = f"{'LoRA' if r.method == 'lora' else r.method} (rank map)"
        else:
            text = f"{'LoRA' if r.method == 'lora' else r.method} r={r.rank}"
        if r.extras:
            text += " (" + ", ".join(f"{k}={_plain(v)}" for k, v in sorted(r.extras.items())) + ")"
        return text

    def seed_label(self, tag: str) -> Optional[str]:
        """The seed row this row sits beside (None: the seed has no such row)."""
        r = self.first
        if r.extras:
            return None
        if r.method == "full":
            return FULL_ROW.get(tag, "Fine-tune")
        if r.method == "lora" and r.rank is not None:
            return f"LoRA r={r.rank}"
        return None


def _plain(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def _read_config_adapter(run_dir: Path) -> Dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return data.get("adapter", {}) if isinstance(data, dict) else {}


def load_runs(root: Path) -> Tuple[List[Run], List[str]]:
    """Every finished stage-3 run under ``root`` (sorted by path), and warnings for files skipped."""
    runs, warnings = [], []
    for summary_path in sorted(root.rglob("summary.json")):
        run_dir = summary_path.parent
        try:
            s = json.loads(summary_path.read_text())
        except json.JSONDecodeError as err:
            warnings.append(f"{summary_path}: unreadable JSON ({err}); skipped")
            continue
        if s.get("stage") != "stage3" or s.get("status", "finished") != "finished":  # running or failed: no result
            continue
        sweep_path = run_dir / "sweep.json"
        sweep = json.loads(sweep_path.read_text()) if sweep_path.is_file() else None
        method = s.get("method", "?")
        if sweep is not None:
            table, row, rank = sweep["table"], sweep["row"], sweep.get("rank")
            extras = {k: v for k, v in sweep.get("point", {}).items() if k not in _NAMED_KEYS}
        else:  # a run made without the sweep driver: its row is its method and rank
            adapter = _read_config_adapter(run_dir)
            rank = None if method in ("full", "head") or adapter.get("rank_map") is not None else adapter.get("rank")
            # without a grid point, runs are comparable only within one experiment and task
            table, extras = "untagged", {"experiment": s.get("experiment", "?"), "task": s.get("task", "?")}
            row = f"{extras['task']}/{extras['experiment']}/{method}" + (
                "" if method in ("full", "head") else ("_rankmap" if rank is None else f"_r{rank}"))
        metric = s["metric"]
        params = s.get("params", {})
        runs.append(Run(path=run_dir, table=table, row=row, method=method, rank=rank, extras=extras,
                        seed=int(s.get("seed", 0)), epochs=int(s.get("epochs", 0)), metric=metric,
                        error=float(s["test"][metric]), trainable=int(params.get("trainable", 0)),
                        adapters=int(params.get("adapters", 0)), task=s.get("task", "?"), body=s.get("body", "?"),
                        weights=str(s.get("weights", "?")), body_params=int(params.get("body", 0))))
    return runs, warnings


def group_rows(runs: Sequence[Run]) -> Dict[str, Dict[str, Row]]:
    """table tag -> row key -> Row, runs of a row sorted by (seed, path) so float sums are reproducible."""
    tables: Dict[str, Dict[str, Row]] = {}
    for run in sorted(runs, key=lambda r: (r.table, r.row, r.seed, str(r.path))):
        tables.setdefault(run.table, {}).setdefault(run.row, Row(run.row)).runs.append(run)
    return tables


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    mean = statistics.fsum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


# ----------------------------------------------------------------------------- formatting
def fmt_m(n: Optional[float]) -> str:
    """Parameters in millions, 3 significant digits (the seed writes 0.08, 4.23, 90)."""
    return "n/a" if n is None else f"{n / 1e6:.3g}"


def fmt_err(x: float) -> str:
    return f"{x:.4f}"


def fmt_mean_std(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{fmt_err(mean)} ± {fmt_err(std)}" if std is not None else f"{fmt_err(mean)} (n=1)"


def fmt_params(row: Row, attr: str) -> str:
    counts = sorted({getattr(r, attr) for r in row.runs})
    return fmt_m(counts[0]) if len(counts) == 1 else f"{fmt_m(counts[0])}-{fmt_m(counts[-1])}"


def _link(path: Path, out_dir: Path) -> str:
    return os.path.relpath(path.resolve(), out_dir.resolve()).replace(os.sep, "/")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("±", r"$\pm$")):
        text = text.replace(a, b)
    return text


# ----------------------------------------------------------------------------- table assembly
@dataclass
class Line:
    """One output row: the seed's numbers (or n/a) and ours (or no runs)."""

    label: str
    seed_params: str
    seed_error: str
    row: Optional[Row]


def table_lines(tag: str, rows: Dict[str, Row], seed_table: Optional[Dict[str, Any]]) -> List[Line]:
    """The seed's rows in its order with ours beside them, then our rows the seed does not have."""
    lines: List[Line] = []
    used = set()
    ordered = sorted(rows.values(), key=lambda r: (r.first.method != "full", r.first.method,
                                                   r.first.rank if r.first.rank is not None else -1, r.key))
    if seed_table is not None:
        for seed_row in seed_table["rows"]:
            model = seed_row["model"]
            ours = [r for r in ordered if r.key not in used and _matches(model, r.seed_label(tag))]
            p, e = f"{seed_row['trainable_params_M']:g}", fmt_err(seed_row["error"])  # as the seed wrote it
            if not ours:
                lines.append(Line(model, p, e, None))
            for r in ours:
                used.add(r.key)
                lines.append(Line(model if r.label() == model else f"{model} (ours: {r.label()})", p, e, r))
    for r in ordered:
        if r.key not in used:
            lines.append(Line(r.label(), "n/a", "n/a", r))
    return lines


def _matches(seed_model: str, label: Optional[str]) -> bool:
    if label is None:
        return False
    if label.startswith("LoRA r="):  # "LoRA r=1", "ORCA-LoRA r=1", "LoRA r=1 (50 epochs)"
        return re.search(rf"(^|-){re.escape(label)}(\s|$)", seed_model) is not None
    return seed_model == label


def _facts(rows: Dict[str, Row]) -> List[str]:
    runs = [r for row in rows.values() for r in row.runs]
    if not runs:
        return []
    epochs = sorted({r.epochs for r in runs})
    bodies = sorted({f"`{r.body}` ({fmt_m(r.body_params)}M body parameters; weights: {r.weights})" for r in runs})
    tasks = sorted({r.task for r in runs})
    metrics = sorted({r.metric for r in runs})
    return [f"- Epochs used (ours): {', '.join(map(str, epochs))}{'' if len(epochs) == 1 else ' (differs by row: see the epochs column)'}",
            f"- Our task: {', '.join(tasks)}; metric: test {', '.join(metrics)} on the best-by-validation checkpoint, "
            f"mean ± sample std (ddof = 1) over seeds",
            f"- Our body: {'; '.join(bodies)}"]


def seed_table_for(tag: str, reference: Optional[Dict[str, Any]]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    if reference is None:
        return None, None
    for key in sorted(reference.get("tables", {})):
        if key == tag or key.startswith(tag + "_"):
            return key, reference["tables"][key]
    return None, None


def render_markdown(tables: Dict[str, Dict[str, Row]], reference: Optional[Dict[str, Any]], out_dir: Path,
                    root_text: str, n_runs: int) -> str:
    out = ["# Results: the seed's Tables 1-4 and ours", "",
           f"Generated by `bash scripts/make_tables.sh` from {n_runs} stage-3 `summary.json` files under "
           f"`{root_text}` (links are relative to this file); do not edit by hand. \"seed\" columns are the seed document's numbers"
           + (f" ({reference.get('source', 'seed_tables.json')}; body: {reference.get('body', 'n/a')})" if reference
              else " (reference file not found: n/a)")
           + ". Params are trainable parameters in millions. Each per-seed error in the runs column links to "
             "its run directory; the params cell links to the row's first run.", ""]
    for tag in [*TABLE_TAGS, *sorted(t for t in tables if t not in TABLE_TAGS)]:
        rows = tables.get(tag, {})
        key, seed_table = seed_table_for(tag, reference)
        title = tag if tag in TABLE_TAGS else f"{tag} (not a seed table)"
        out += [f"## {title}" + (f": {key}" if key else ""), ""]
        if seed_table is not None:
            out += [f"- Seed setup: {seed_table.get('setup', 'n/a')}"]
        facts = _facts(rows)
        out += facts if facts else [f"- **no runs**: no finished stage-3 run tagged {tag} under `{root_text}`"]
        out += ["", "| model | seed params (M) | seed error | our params (M) | our adapter params (M) "
                    "| our error | epochs | runs (random seed: error) |",
                "|---|---|---|---|---|---|---|---|"]
        for line in table_lines(tag, rows, seed_table):
            if line.row is None:
                ours = ["no runs"] * 3 + ["", ""]
            else:
                r = line.row
                first = _link(r.first.path, out_dir)
                ours = [f"[{fmt_params(r, 'trainable')}]({first})", fmt_params(r, "adapters"),
                        fmt_mean_std([x.error for x in r.runs]),
                        "/".join(map(str, sorted({x.epochs for x in r.runs}))),
                        " ".join(f"[s{x.seed}: {fmt_err(x.error)}]({_link(x.path, out_dir)})" for x in r.runs)]
            out.append("| " + " | ".join(_md_escape(c) for c in [line.label, line.seed_params, line.seed_error, *ours]) + " |")
        out.append("")
    return "\n".join(out)


def render_latex(tables: Dict[str, Dict[str, Row]], reference: Optional[Dict[str, Any]], out_dir: Path) -> str:
    """One tabular per table; our numbers are \\href links to their run directories (needs hyperref)."""
    out = ["% Generated by scripts/make_tables.py from run summaries; do not edit by hand. Needs \\usepackage{hyperref}."]
    for tag in [*TABLE_TAGS, *sorted(t for t in tables if t not in TABLE_TAGS)]:
        rows = tables.get(tag, {})
        key, seed_table = seed_table_for(tag, reference)
        epochs = sorted({r.epochs for row in rows.values() for r in row.runs})
        caption = (f"{_tex_escape(key or tag)}: seed numbers beside ours; "
                   + (f"our runs used {', '.join(map(str, epochs))} epochs; " if epochs else "no runs; ")
                   + "errors are mean $\\pm$ sample std over seeds (n runs).")
        out += ["", "\\begin{table}[t]", "\\centering", "\\begin{tabular}{lrrrrl}", "\\hline",
                "model & seed params (M) & seed error & our params (M) & our error & n \\\\", "\\hline"]
        for line in table_lines(tag, rows, seed_table):
            if line.row is None:
                ours = ["no runs", "no runs", ""]
            else:
                r = line.row
                first = _link(r.first.path, out_dir)
                ours = [f"\\href{{{first}}}{{{fmt_params(r, 'trainable')}}}",
                        f"\\href{{{first}}}{{{_tex_escape(fmt_mean_std([x.error for x in r.runs]))}}}",
                        str(len(r.runs))]
            out.append(" & ".join([_tex_escape(line.label), line.seed_params, line.seed_error, *ours]) + " \\\\")
        out += ["\\hline", "\\end{tabular}", f"\\caption{{{caption}}}", f"\\label{{tab:{tag}}}", "\\end{table}"]
    return "\n".join(out) + "\n"


def load_reference(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """The seed's tables from ``path`` or the first existing default location (None if none exists)."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--reference {path}: no such file")
        return json.loads(Path(path).read_text())
    for candidate in REFERENCE_CANDIDATES:
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def make_tables(root: Path, out: Path, reference: Optional[Dict[str, Any]]) -> Tuple[str, str, List[str]]:
    """Markdown and LaTeX text of all tables from the runs under ``root`` (links relative to ``out``)."""
    runs, warnings = load_runs(root)
    tables = group_rows(runs)
    out_dir = out.parent
    root_text = _link(root, out_dir) if root.exists() else str(root)
    md = render_markdown(tables, reference, out_dir, root_text, len(runs))
    return md, render_latex(tables, reference, out_dir), warnings


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="results/runs", help="directory scanned for summary.json (recursively)")
    parser.add_argument("--out", default="results/tables.md", help="markdown output; the LaTeX goes next to it as .tex")
    parser.add_argument("--reference", default=None, help="the seed's tables JSON (default: "
                        + " or ".join(str(p) for p in REFERENCE_CANDIDATES) + ")")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the outputs would change")
    args = parser.parse_args(argv)
    out = Path(args.out)
    md, tex, warnings = make_tables(Path(args.root), out, load_reference(args.reference))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    tex_path = out.with_suffix(".tex")
    if args.check:
        stale = [p for p, text in ((out, md), (tex_path, tex))
                 if not p.is_file() or p.read_text(encoding="utf-8") != text]
        for p in stale:
            print(f"stale: {p} (run bash scripts/make_tables.sh)", file=sys.stderr)
        return 1 if stale else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md, encoding="utf-8")
    tex_path.write_text(tex, encoding="utf-8")
    print(f"wrote {out} and {tex_path}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
