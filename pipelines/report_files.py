"""``mixmae report``'s outputs: four tables (CSV, Markdown, the console, JSON) and one figure,
logged to the experiment's ``report-<experiment>`` MLflow run.

Every output shows the same tables, built once here as rows of plain values: numbers stay
numbers in the CSV files and the JSON, and are rounded only for reading (Markdown, console).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, NamedTuple, Optional

from mlflow.tracking import MlflowClient

from pipelines.report import (
    METHOD_COLOURS, BudgetPoint, Comparison, Report, ReportRow, SeedGroup, at_budget, build_report,
)
from pipelines.report_stats import spread
from pipelines.tracking import KIND, RunLogger, start_or_resume

ENCODER_MARKERS = ("o", "s", "^", "D", "v", "P")
ENCODER_LINES = ("-", "--", ":", "-.")
PLOT = "flops_vs_accuracy.png"
MARKDOWN = "report.md"
class TableSpec(NamedTuple):
    file: str
    title: str
    columns: tuple[str, ...]
    """All of them, in the CSV files and the JSON."""
    shown: tuple[str, ...]
    """Those a reader needs (Markdown, console): the group's label already names method and encoder."""


#: The runs' file keeps its name from before seed groups, and its Pareto column last, for the scripts that read it.
TABLES = {
    "runs": TableSpec(
        "flops_vs_accuracy.csv", "Runs: accuracy with Wilson's 95% interval over the validation images",
        ("run_id", "name", "group", "method", "encoder", "mask_ratio", "epochs", "seed", "metric", "accuracy",
         "wilson_low", "wilson_high", "val_images", "pretrain_flops", "pareto_within_method"),
        ("name", "group", "seed", "accuracy", "wilson_low", "wilson_high", "val_images", "pretrain_flops",
         "pareto_within_method")),
    "groups": TableSpec(
        "seed_groups.csv", "Settings over seeds: mean, standard deviation, 95% t-interval of the mean",
        ("group", "method", "encoder", "metric", "n_seeds", "seeds", "mean", "std", "t95_low", "t95_high", "note",
         "mean_wilson_half_width", "pretrain_flops", "pareto_within_method"),
        ("group", "n_seeds", "seeds", "mean", "std", "t95_low", "t95_high", "note", "mean_wilson_half_width",
         "pretrain_flops", "pareto_within_method")),
    "comparisons": TableSpec(
        "paired_comparisons.csv", "Methods paired by seed on each encoder: first minus second",
        ("encoder", "metric", "first", "second", "first_group", "second_group", "n_seeds", "differences",
         "mean_difference", "t95_low", "t95_high", "verdict"),
        ("first_group", "second_group", "n_seeds", "differences", "mean_difference", "t95_low", "t95_high",
         "verdict")),
    "budgets": TableSpec(
        "flops_budgets.csv", "k-NN accuracy at common pretraining FLOPs budgets",
        ("encoder", "group", "method", "budget_flops", "n_seeds", "seeds", "mean", "std", "t95_low", "t95_high",
         "seeds_short", "note"),
        ("group", "budget_flops", "n_seeds", "seeds", "mean", "std", "t95_low", "t95_high", "seeds_short", "note")),
}
RULES = """\
A group is the runs of one setting that differ only by seed; its interval is Student's t
over seeds (n-1 degrees of freedom), none for one seed. A comparison pairs two methods'
groups seed by seed on the same encoder and other settings: a method is above the other
when the 95% t-interval of the mean paired difference excludes 0, otherwise the difference
is within noise; one shared seed gives no verdict. Budgets lie inside the pretraining FLOPs
that every method on the encoder reaches; a run is read off its k-NN curve (linear in log
FLOPs), never beyond it, so a run that stopped short counts only where it got to."""


def _run_record(run: ReportRow) -> dict[str, Any]:
    low, high = run.interval() if run.val_images else (None, None)
    return dict(
        run_id=run.run_id, name=run.name, group=run.group, method=run.method, encoder=run.encoder,
        mask_ratio=run.mask_ratio, epochs=run.epochs, seed=run.seed, metric=run.metric, accuracy=run.accuracy,
        wilson_low=low, wilson_high=high, val_images=run.val_images, pretrain_flops=run.flops,
        pareto_within_method=run.pareto,
    )


def _group_record(group: SeedGroup) -> dict[str, Any]:
    s = group.spread
    return dict(
        group=group.label, method=group.method, encoder=group.encoder, metric=group.metric, n_seeds=s.n,
        seeds=list(group.accuracy_by_seed()), mean=s.mean, std=s.std, t95_low=s.low, t95_high=s.high, note=s.note,
        mean_wilson_half_width=group.wilson_half_width(), pretrain_flops=group.flops,
        pareto_within_method=group.pareto,
    )


def _comparison_record(comparison: Comparison) -> dict[str, Any]:
    first, second, s = comparison.first, comparison.second, comparison.spread
    return dict(
        encoder=first.encoder, metric=first.metric, first=first.method, second=second.method,
        first_group=first.label, second_group=second.label, n_seeds=s.n, differences=comparison.differences,
        mean_difference=s.mean, t95_low=s.low, t95_high=s.high, verdict=comparison.verdict,
    )


def _budget_record(point: BudgetPoint) -> dict[str, Any]:
    group, s = point.group, point.spread
    return dict(
        encoder=group.encoder, group=group.label, method=group.method, budget_flops=point.budget, n_seeds=s.n,
        seeds=list(point.values), mean=s.mean, std=s.std, t95_low=s.low, t95_high=s.high, seeds_short=point.short,
        note=s.note,
    )


def tables(report: Report) -> dict[str, list[dict[str, Any]]]:
    """Rows of plain values per table, the keys those of :data:`TABLES`."""
    return {
        "runs": [_run_record(r) for g in report.groups for r in sorted(g.runs, key=lambda r: r.seed)],
        "groups": [_group_record(g) for g in report.groups],
        "comparisons": [_comparison_record(c) for c in report.comparisons],
        "budgets": [_budget_record(b) for b in report.budgets],
    }


def report_json(report: Report, files: list[Path], run_id: str) -> dict[str, Any]:
    return {"experiment": report.experiment, "metric": report.metric, **tables(report),
            "files": [str(f) for f in files], "mlflow_run_id": run_id}


def cell(value: Any) -> str:
    """A value as a reader wants it: accuracies to 4 places, FLOPs in powers of ten."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.3e}" if abs(value) >= 1e4 else f"{value:.4f}"
    if isinstance(value, dict):
        return " ".join(f"{key}:{item:+.4f}" for key, item in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def write_tables(report: Report, out: Path) -> list[Path]:
    """The four CSV files and the Markdown file holding the same tables."""
    written, markdown = [], [f"# {heading(report)}", "", RULES]
    for name, rows in tables(report).items():
        spec = TABLES[name]
        path = out / spec.file
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=spec.columns)
            writer.writeheader()
            writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
        written.append(path)
        markdown += ["", f"## {spec.title}", "", "| " + " | ".join(spec.shown) + " |", "|" + "---|" * len(spec.shown)]
        markdown += ["| " + " | ".join(cell(row[c]) for c in spec.shown) + " |" for row in rows] or ["(none)"]
    path = out / MARKDOWN
    path.write_text("\n".join(markdown) + "\n")
    return [*written, path]


def heading(report: Report) -> str:
    return f"{report.experiment}: {report.metric} across seeds, methods and pretraining FLOPs"


def console_tables(report: Report) -> list:
    """The heading and the Markdown file's tables, for the console (rich)."""
    from rich.table import Table

    printed: list = [heading(report)]
    for name, rows in tables(report).items():
        spec = TABLES[name]
        table = Table(title=spec.title)
        for column in spec.shown:
            table.add_column(column)
        for row in rows:
            table.add_row(*(cell(row[c]) for c in spec.shown))
        printed.append(table)
    return printed


def write_report(report: Report, out: Path) -> list[Path]:
    """Every file of the report under ``out``: the tables, then the figure."""
    out.mkdir(parents=True, exist_ok=True)
    return [*write_tables(report, out), write_plot(report, out / PLOT)]


def write_plot(report: Report, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = sorted({g.encoder for g in report.groups})
    figure, (final, curves) = plt.subplots(1, 2, figsize=(14, 5.5))
    _plot_final(final, report, encoders)
    _plot_curves(curves, report, encoders)
    figure.suptitle(f"{report.experiment}: accuracy against pretraining FLOPs, by method and encoder", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_final(axis, report: Report, encoders: list[str]) -> None:
    """Group means with their across-seed interval, each run faint with its Wilson interval,
    and each method's Pareto front over its groups."""
    from matplotlib.lines import Line2D

    for group in report.groups:
        colour = METHOD_COLOURS.get(group.method, "tab:gray")
        marker = ENCODER_MARKERS[encoders.index(group.encoder) % len(ENCODER_MARKERS)]
        for run in group.runs:
            low, high = run.interval()
            axis.errorbar(run.flops, run.accuracy, yerr=[[run.accuracy - low], [high - run.accuracy]], fmt=marker,
                          color=colour, alpha=0.25, capsize=2, markersize=5)
        s = group.spread
        error = [[s.mean - s.low], [s.high - s.mean]] if s.low is not None else None
        axis.errorbar(group.flops, s.mean, yerr=error, fmt=marker, color=colour, capsize=4, markersize=8,
                      markeredgecolor="black")
    for method in sorted({g.method for g in report.groups}):
        front = sorted((g for g in report.groups if g.method == method and g.pareto), key=lambda g: g.flops)
        colour = METHOD_COLOURS.get(method, "tab:gray")
        axis.plot([g.flops for g in front], [g.accuracy for g in front], "-", color=colour, alpha=0.6)
    handles = [Line2D([], [], color=METHOD_COLOURS.get(m, "tab:gray"), marker="o", label=m)
               for m in sorted({g.method for g in report.groups})]
    handles += [Line2D([], [], color="black", linestyle="", label=e,
                       marker=ENCODER_MARKERS[i % len(ENCODER_MARKERS)]) for i, e in enumerate(encoders)]
    axis.legend(handles=handles, fontsize=7, loc="best")
    axis.set_xscale("log")
    axis.set_xlabel("pretraining FLOPs")
    axis.set_ylabel(f"{report.metric}: mean over seeds, 95% t-interval (faint: runs, Wilson)")


def _plot_curves(axis, report: Report, encoders: list[str]) -> None:
    """Each group's k-NN accuracy along its pretraining, mean over seeds with its 95% band,
    thin where some seeds stopped short (the mean moves as they drop out), and the budgets of
    the budget table as dotted lines."""
    import numpy as np

    drawn = False
    for group in report.groups:
        curves = [r.curve for r in group.runs if r.curve]
        if not curves:
            continue
        grid = np.geomspace(min(c[0][0] for c in curves), max(c[-1][0] for c in curves), 40)
        spreads = [spread(list(at_budget(group.runs, x).values())) for x in grid]
        seeds = len({r.seed for r in group.runs if r.curve})
        mean = np.array([s.mean if s.n else math.nan for s in spreads])
        every = np.array([s.n == seeds for s in spreads])
        low = np.array([s.low if s.low is not None else math.nan for s in spreads])
        high = np.array([s.high if s.high is not None else math.nan for s in spreads])
        colour = METHOD_COLOURS.get(group.method, "tab:gray")
        style = ENCODER_LINES[encoders.index(group.encoder) % len(ENCODER_LINES)]
        axis.plot(grid, np.where(every, mean, math.nan), style, color=colour, label=group.label)
        axis.plot(grid, np.where(every, math.nan, mean), style, color=colour, linewidth=0.7)
        axis.fill_between(grid, low, high, color=colour, alpha=0.15)
        drawn = True
    for budget in sorted({b.budget for b in report.budgets}):
        axis.axvline(budget, color="gray", linestyle=":", linewidth=0.8)
    if drawn:
        axis.legend(fontsize=6, loc="best")
        axis.set_xscale("log")
    else:
        axis.text(0.5, 0.5, "no k-NN curves recorded by these runs", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("pretraining FLOPs (dotted: the budgets)")
    axis.set_ylabel("k-NN top-1: mean over seeds (thin: not all seeds), 95% t-band")


def run_report(tracking_uri: str, experiment: str, out: Path, metric: Optional[str] = None):
    """Build the report, write its files under ``out`` and log them to the experiment's
    ``report-<experiment>`` run; returns the report, the files and that run's id."""
    client = MlflowClient(tracking_uri)
    report = build_report(client, experiment, metric)
    files = write_report(report, out)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = start_or_resume(client, experiment_id, f"report-{experiment}", {KIND: "report"})
    RunLogger(tracking_uri, run.info.run_id).artifacts(files, "report")
    client.set_terminated(run.info.run_id, "FINISHED")
    return report, files, run.info.run_id
