"""Accuracy against pretraining FLOPs across pipeline runs and sweep trials, from MLflow.

Reads every finished pipeline run of an experiment (sweep trials are pipeline runs too),
writes a CSV table and a PNG scatter plot with the Pareto front marked (the runs no other
run beats on both axes), and logs both to a ``report`` run of the same experiment.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlflow.tracking import MlflowClient

from pipelines.sweep import FLOPS_METRIC, PROBE_METRIC
from pipelines.tracking import KIND, RunLogger, start_or_resume

PRETRAIN_FLOPS = "pretrain.flops_train_total"


@dataclass
class ReportRow:
    run_id: str
    name: str
    flops: float
    accuracy: float
    mask_ratio: str
    epochs: str
    pareto: bool = False


def accuracy_key(metrics: dict[str, float], requested: Optional[str]) -> Optional[str]:
    """The accuracy to plot: the requested metric, else a sweep's probe accuracy, else the
    first classification stage's top-1 (alphabetically, so the choice is stable)."""
    if requested:
        return requested if requested in metrics else None
    if PROBE_METRIC in metrics:
        return PROBE_METRIC
    return next((k for k in sorted(metrics) if k.endswith(".val_top1")), None)


def collect(client: MlflowClient, experiment: str, metric: Optional[str] = None) -> tuple[list[ReportRow], str]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} at {client.tracking_uri}")
    runs = client.search_runs(
        [found.experiment_id], f"tags.`{KIND}` = 'pipeline' and attributes.status = 'FINISHED'", max_results=5000
    )
    rows, keys = [], set()
    for run in runs:
        m = run.data.metrics
        key = accuracy_key(m, metric)
        flops = m.get(FLOPS_METRIC, m.get(PRETRAIN_FLOPS))
        if key is None or flops is None:
            continue
        keys.add(key)
        params = run.data.params
        rows.append(
            ReportRow(
                run.info.run_id, run.info.run_name, flops, m[key],
                params.get("mask_ratio", params.get("pretrain.mask_ratio", "")),
                params.get("epochs", params.get("pretrain.epochs", "")),
            )
        )
    if not rows:
        raise ValueError(
            f"experiment {experiment!r} has no finished pipeline run with pretraining FLOPs and "
            f"{metric or 'an accuracy metric'}"
        )
    mark_pareto(rows)
    label = metric or (PROBE_METRIC if keys == {PROBE_METRIC} else " / ".join(sorted(keys)))
    return sorted(rows, key=lambda r: r.flops), label


def mark_pareto(rows: list[ReportRow]) -> None:
    """Mark the runs on the front: none other has at most their FLOPs and more accuracy."""
    best = -math.inf
    for row in sorted(rows, key=lambda r: (r.flops, -r.accuracy)):
        if row.accuracy > best:
            row.pareto = True
            best = row.accuracy


def write_report(rows: list[ReportRow], label: str, out: Path, title: str) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    table = out / "flops_vs_accuracy.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "name", "mask_ratio", "epochs", "pretrain_flops", label, "pareto"])
        for r in rows:
            writer.writerow([r.run_id, r.name, r.mask_ratio, r.epochs, f"{r.flops:.6g}", f"{r.accuracy:.6g}", r.pareto])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.scatter([r.flops for r in rows], [r.accuracy for r in rows], color="tab:blue", label="runs")
    front = [r for r in rows if r.pareto]
    axis.plot([r.flops for r in front], [r.accuracy for r in front], "o-", color="tab:red", label="Pareto front")
    for r in rows:
        axis.annotate(f"r={r.mask_ratio} ep={r.epochs}" if r.mask_ratio else r.name, (r.flops, r.accuracy),
                      fontsize=7, xytext=(4, 4), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("pretraining FLOPs")
    axis.set_ylabel(label)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    plot = out / "flops_vs_accuracy.png"
    figure.savefig(plot, dpi=120)
    plt.close(figure)
    return table, plot


def run_report(tracking_uri: str, experiment: str, out: Path, metric: Optional[str] = None):
    client = MlflowClient(tracking_uri)
    rows, label = collect(client, experiment, metric)
    table, plot = write_report(rows, label, out, f"{experiment}: {label} vs pretraining FLOPs")
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = start_or_resume(client, experiment_id, f"report-{experiment}", {KIND: "report"})
    logger = RunLogger(tracking_uri, run.info.run_id)
    logger.artifacts([table, plot], "report")
    client.set_terminated(run.info.run_id, "FINISHED")
    return rows, label, table, plot, run.info.run_id
