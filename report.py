"""The paper's table regenerated from runs, with training curves and plots (docs/training.md, "Results").

    python report.py runs                   # or: make table   -> runs/report/table.md
    python report.py runs --plots           # or: make plots   -> also curves/<run>.png, differences.png

Runs are grouped into columns by --tag: mean and standard deviation of the final and best test accuracy. A run of a
paper column read otherwise than our default (depth, RA mode, precision, lr...) gets its own column (`reading`), and
so does a run on another dataset than CIFAR-10, shown next to that dataset's reference, never the paper's figure.
"""
import argparse
import csv
import errno
import fcntl
import json
import math
import os
import re
import statistics
import sys
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

# arXiv 2501.06220, Table 1 (CIFAR-10 top-1 %, one seed each; runtime in seconds, GPU not stated), in its layout, one
# row per column: group, name, make target, runtime and accuracy (empty: no number published).
with open(Path(__file__).with_name("paper_table.csv"), newline="") as table:
    PAPER = [(group, name, target, int(time) if time else None, float(acc) if acc else None)
             for group, name, target, time, acc in list(csv.reader(table))[1:]]
PAPER_TARGETS = {row[2] for row in PAPER}
DDP_TARGETS = ("ddp-bs256", "ddp-bs1024", "lion-bs1024")
# The same ViT (dim 192, depth 9, 12 heads, MLP x2), 100 epochs of this recipe at batch 128, on other datasets.
REFERENCE = {"cifar100": 73.81, "svhn": 97.82, "tinyimagenet": 57.07}
REFERENCE_SOURCE = "the SPT/LSA paper's ViT (Lee et al. 2021, aanna0701/SPT_LSA_ViT): its settings in docs/datasets.md"


def reading(summary: dict, target: str) -> str:
    """How a run of a paper column read the seed where that differs from our default for the column (the ambiguities
    of docs/faithfulness.md; for lr and weight decay, any change), e.g. "depth 12, fp32"; "" where it does not."""
    args = summary.get("args", {})
    lion = target == "lion-bs1024"
    ours = {"depth": ("depth", 9), "ra_mode": ("RA", "in-batch" if target in DDP_TARGETS else "shuffles"),
            "lr": ("lr", 1e-4 if lion else 1e-3), "weight_decay": ("wd", 0.5 if lion else 0.05),
            "same_seed_on_ranks": ("same seed on ranks", False)}
    other = []
    for key, (label, default) in ours.items():
        value = args.get(key, default)
        if value != default:
            other.append(label if default is False else f"{label} {value}")
    # Every table target passes --amp: bf16 is our default reading.
    precision = summary.get("precision", "bf16")
    if precision != "bf16":
        other.append(precision)
    return ", ".join(other)


# A complete run read from its folder: its column's key (target, reading), its seed, summary.json, metrics records.
RunResult = namedtuple("RunResult", "folder key seed summary metrics")


@dataclass
class Column:
    """The runs of one column of the table: one target (a make target or --tag), read one way (reading)."""

    target: str
    reading: str
    runs: list

    @property
    def dataset(self) -> str:
        return self.runs[0].summary.get("args", {}).get("dataset", "cifar10")

    @property
    def label(self) -> str:
        return f"{self.target} [{self.reading}]" if self.reading else self.target

    @property
    def tagged(self) -> bool:
        """Whether its runs name their column (--tag, as every make target sets); else they are runs of a folder."""
        return any(run.summary.get("args", {}).get("tag") for run in self.runs)

    def values(self, key):
        return [run.summary[key] for run in self.runs if run.summary.get(key) is not None]

    def mean_std(self, key):
        values = self.values(key)
        mean = statistics.mean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else None
        return mean, std


def column_key(folder: Path, summary: dict):
    """The run's column as (target, reading): its --tag (else its folder's name without -seed<N>), and its dataset
    where not CIFAR-10, then for a paper column read otherwise than our default, that reading ("" for ours)."""
    target = summary.get("args", {}).get("tag") or re.sub(r"-seed\d+$", "", folder.name)
    dataset = summary.get("args", {}).get("dataset", "cifar10")
    readings = [] if dataset == "cifar10" else [dataset]
    if target in PAPER_TARGETS:
        readings.append(reading(summary, target))
    return target, ", ".join(filter(None, readings))


def holder_of(folder: Path):
    """Who trains in `folder` now ("pid N on host", from its .lock), or None: a train.py holds an OS lock on its
    .lock for its whole life, so a shared lock is refused to us (and granted, then dropped at once, when none runs)."""
    try:
        fd = os.open(folder / ".lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            return None
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)
    return None


def load_runs(root: Path, with_metrics: bool = False):
    """The complete runs under `root`, and the problems met: each one line naming the folder or file and what is
    wrong. Metrics are read only `with_metrics` (for the curves)."""
    runs = []
    problems = []
    folders = sorted(p.parent for p in root.glob("*/summary.json")) + sorted(
        p.parent for p in root.glob("*/metrics.jsonl") if not (p.parent / "summary.json").exists())
    for folder in folders:
        summary_path = folder / "summary.json"
        holder = holder_of(folder)
        if holder:
            problems.append(f"{folder}: running ({holder}): not counted until it ends")
            continue
        if not summary_path.exists():
            problems.append(f"{folder}: no summary.json (still running, or stopped before its end)")
            continue
        try:
            summary = json.loads(summary_path.read_text())
            seed = summary["args"]["seed"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            problems.append(f"{summary_path}: unreadable ({type(e).__name__}: {e})")
            continue
        if not summary.get("complete"):
            problems.append(f"{folder}: incomplete ({summary.get('epochs_done')} of {summary.get('epochs')} epochs); "
                            f"continue it with --resume {folder / 'checkpoint.pt'}")
            continue
        metrics = []
        if with_metrics:
            # A complete run's records are whole lines (train.py drops a partial one when it resumes).
            metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        runs.append(RunResult(folder, column_key(folder, summary), seed, summary, metrics))
    return runs, problems


def group_columns(runs, problems) -> dict:
    """{(target, reading): Column} of the runs."""
    columns = {}
    for run in runs:
        column = columns.setdefault(run.key, Column(*run.key, runs=[]))
        if any(other.seed == run.seed for other in column.runs):
            problems.append(f"{run.folder}: a second run of {column.label!r} with seed {run.seed} (both counted)")
        column.runs.append(run)
    return columns


def fmt(mean, std, digits=2):
    if mean is None:
        return "—"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_rows(columns, only_run=False):
    """(group, name, column key, paper time, paper acc) for the paper's columns, each followed by its CIFAR-10 runs of
    other readings; then every other column found, a column on another dataset with that dataset's REFERENCE."""
    rows = []
    for group, name, target, paper_time, paper_acc in PAPER:
        if (target, "") in columns or not only_run:
            rows.append((group, name, (target, ""), paper_time, paper_acc))
        for key in sorted(key for key in columns if key[0] == target and key[1] and columns[key].dataset == "cifar10"):
            rows.append((group, f"{name} [{key[1]}]", key, paper_time, paper_acc))
    known = {row[2] for row in rows}
    others = [key for key in sorted(columns) if key not in known]
    return rows + [("Other" if columns[key].tagged else "Run", columns[key].label, key, None,
                    REFERENCE.get(columns[key].dataset)) for key in others]


def markdown_table(columns, expected_seeds=None, only_run=False):
    lines = ["| group | column | target | final acc % | best acc % | seeds | train time s | device | paper acc % "
             "| final − paper | paper time s | dataset |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    missing = []
    for group, name, key, paper_time, paper_acc in table_rows(columns, only_run):
        column = columns.get(key)
        if column is None:
            lines.append(f"| {group} | {name} | `{key[0]}` | not run | | 0 | | | {fmt(paper_acc, None)} | "
                         f"| {paper_time or '—'} | cifar10 |")
            missing.append(key[0])
            continue
        final, final_std = column.mean_std("final_acc")
        best, best_std = column.mean_std("best_acc")
        seconds, _ = column.mean_std("train_seconds")
        devices = ", ".join(sorted(set(column.values("device_name")))) or "—"
        diff = fmt(final - paper_acc, None) if paper_acc is not None else "—"
        target = f"`{column.label}`" if column.tagged else "(a run without --tag)"
        lines.append(f"| {group} | {name} | {target} | {fmt(final, final_std)} | {fmt(best, best_std)} "
                     f"| {len(column.runs)} | {fmt(seconds, None, 0)} | {devices} | {fmt(paper_acc, None)} | {diff} "
                     f"| {paper_time or '—'} | {column.dataset} |")
        if expected_seeds and len(column.runs) < expected_seeds:
            missing.append(f"{column.label} ({len(column.runs)} of {expected_seeds} seeds)")
    return "\n".join(lines), missing


def epochs_axis(run, records):
    """Fractional epoch of each record: steps / steps per epoch."""
    steps_per_epoch = run.summary["steps"] / max(run.summary["epochs_done"], 1)
    return [r["step"] / steps_per_epoch for r in records]


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(run, path):
    train = [r for r in run.metrics if r.get("kind") == "train"]
    evals = [r for r in run.metrics if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    axes[0].plot(epochs_axis(run, train), [r["loss"] for r in train])
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].plot(epochs_axis(run, evals), [r["acc"] for r in evals], marker="o", markersize=3)
    axes[1].set(title="test accuracy %", xlabel="epoch")
    axes[2].plot(epochs_axis(run, train), [r["lr"] for r in train])
    axes[2].set(title="learning rate", xlabel="epoch")
    fig.suptitle(run.folder.name, fontsize=10)
    save(fig, path)


def differences(columns, baseline):
    """{label: (mean final − baseline's mean final, error)} for every column but the baseline (a column key); the
    error adds the two standard errors in quadrature."""
    base = columns[baseline]
    base_mean, base_std = base.mean_std("final_acc")
    result = {}
    for key, column in sorted(columns.items()):
        if key == baseline:
            continue
        mean, std = column.mean_std("final_acc")
        error = math.sqrt((std or 0) ** 2 / len(column.runs) + (base_std or 0) ** 2 / len(base.runs))
        result[column.label] = (mean - base_mean, error)
    return result


def plot_differences(columns, baseline, path):
    diffs = differences(columns, baseline)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(diffs) + 2), 3.5))
    names = list(diffs)
    ax.bar(names, [diffs[n][0] for n in names], yerr=[diffs[n][1] for n in names], capsize=4,
           color=["tab:green" if diffs[n][0] >= 0 else "tab:red" for n in names])
    ax.axhline(0, color="black", linewidth=0.8)
    label = columns[baseline].label
    ax.set(ylabel=f"final acc − {label} (points)", title=f"vs {label} (± standard error)")
    ax.tick_params(axis="x", rotation=45)
    save(fig, path)


def get_args_parser():
    parser = argparse.ArgumentParser(description="Regenerate the paper's table (and plots) from a folder of runs.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("runs", help="folder whose sub-folders are runs (summary.json + metrics.jsonl)")
    add("--out", help="where table.md and plots go (unset: <runs>/report)")
    add("--plots", action="store_true", help="also write PNG plots")
    add("--baseline", default="baseline", help="the column the others are compared with in differences.png")
    add("--seeds", type=int, help="seeds each column should have (to list shortfalls)")
    add("--only-run", action="store_true", help="leave out the paper's columns without runs (if none has any: always)")
    return parser


def main(args):
    root = Path(args.runs)
    if not root.is_dir():
        print(f"report.py: error: {root} is not a folder of runs", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out) if args.out else root / "report"
    runs, problems = load_runs(root, with_metrics=args.plots)
    columns = group_columns(runs, problems)
    # Where none of the paper's columns has runs (a demo, your own images), the table is the runs there are.
    papers = any(key[0] in PAPER_TARGETS and column.dataset == "cifar10" for key, column in columns.items())
    table, missing = markdown_table(columns, args.seeds, args.only_run or not papers)
    notes = [f"- {problem}" for problem in problems]
    if any(column.dataset in REFERENCE for column in columns.values()):
        notes.append(f"- paper acc of a column on another dataset than CIFAR-10: {REFERENCE_SOURCE}")
    if missing:
        notes.insert(0, f"- not run or short of seeds: {', '.join(missing)}")
    if not papers and not args.only_run:
        notes.insert(0, f"- none of the paper's {len(PAPER)} columns has runs under {root}: only the runs found are "
                     f"listed (make table-runs runs the paper's columns)")
    text = table + "\n"
    if notes:
        text = table + "\n\n" + "\n".join(notes) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    print(text)
    if args.plots and columns:
        (out / "curves").mkdir(exist_ok=True)
        for run in runs:
            if run.metrics:
                plot_curves(run, out / "curves" / f"{run.folder.name}.png")
        baseline = next((key for key, column in columns.items() if column.label == args.baseline), None)
        if baseline is not None and len(columns) > 1:
            plot_differences(columns, baseline, out / "differences.png")
        else:
            print(f"differences.png not written: it needs runs of --baseline {args.baseline!r} and of another "
                  f"column (columns: {', '.join(column.label for column in columns.values())})", file=sys.stderr)
    print(f"written to {out}", file=sys.stderr)
    return columns, problems


if __name__ == "__main__":
    main(get_args_parser().parse_args())
