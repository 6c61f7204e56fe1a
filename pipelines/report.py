"""Accuracy against pretraining FLOPs across pipeline runs and sweep trials, from MLflow.

Reads every finished pipeline run of an experiment (sweep trials are pipeline runs too),
writes a CSV table and a PNG scatter plot, and logs both to a ``report`` run of the same
experiment. Points are coloured by pretraining method and shaped by encoder; each carries
its 95% interval (Wilson's, from the number of validation images it was scored on); each
method has its own Pareto front (the runs of that method no other of its runs beats on
both axes), so the fronts can be compared.
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
METHOD_COLOURS = {"mixmae": "tab:red", "simmim": "tab:blue", "mae": "tab:green"}
ENCODER_MARKERS = ("o", "s", "^", "D", "v", "P")


@dataclass
class ReportRow:
    run_id: str
    name: str
    flops: float
    accuracy: float
    mask_ratio: str
    epochs: str
    method: str = ""
    encoder: str = ""
    val_images: int = 0
    """Validation images the accuracy was scored on (0: unknown, no interval)."""
    pareto: bool = False

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson's 95% interval of the accuracy as a binomial proportion over ``val_images``."""
        n, p = self.val_images, self.accuracy
        if n <= 0:
            return p, p
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return centre - half, centre + half


def accuracy_key(metrics: dict[str, float], requested: Optional[str]) -> Optional[str]:
    """The accuracy to plot: the requested metric, else a sweep's probe accuracy, else the
    first classification stage's top-1 (alphabetically, so the choice is stable)."""
    if requested:
        return requested if requested in metrics else None
    if PROBE_METRIC in metrics:
        return PROBE_METRIC
    return next((k for k in sorted(metrics) if k.endswith(".val_top1")), None)


def _val_images(metrics: dict[str, float], key: str) -> int:
    """How many images the accuracy ``key`` was scored on (the stage's ``data_val_images``)."""
    stage = "probe" if key == PROBE_METRIC else key.split(".", 1)[0]
    return int(metrics.get(f"{stage}.data_val_images", 0))


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
                method=params.get("method", params.get("pretrain.method", "mixmae")),
                encoder=params.get("model", params.get("pretrain.model", "")),
                val_images=_val_images(m, key),
            )
        )
    if not rows:
        raise ValueError(
            f"experiment {experiment!r} has no finished pipeline run with pretraining FLOPs and "
            f"{metric or 'an accuracy metric'}"
        )
    for method in {r.method for r in rows}:
        mark_pareto([r for r in rows if r.method == method])
    label = metric or (PROBE_METRIC if keys == {PROBE_METRIC} else " / ".join(sorted(keys)))
    return sorted(rows, key=lambda r: (r.method, r.flops)), label


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
    from matplotlib.lines import Line2D

    out.mkdir(parents=True, exist_ok=True)
    table = out / "flops_vs_accuracy.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "name", "method", "encoder", "mask_ratio", "epochs", "pretrain_flops", label,
                         "ci95_low", "ci95_high", "val_images", "pareto_within_method"])
        for r in rows:
            low, high = r.interval()
            writer.writerow([r.run_id, r.name, r.method, r.encoder, r.mask_ratio, r.epochs, f"{r.flops:.6g}",
                             f"{r.accuracy:.6g}", f"{low:.4f}", f"{high:.4f}", r.val_images, r.pareto])
    encoders = sorted({r.encoder for r in rows})
    markers = {e: ENCODER_MARKERS[i % len(ENCODER_MARKERS)] for i, e in enumerate(encoders)}
    figure, axis = plt.subplots(figsize=(8, 5))
    for method in sorted({r.method for r in rows}):
        colour = METHOD_COLOURS.get(method, "tab:gray")
        group = [r for r in rows if r.method == method]
        for r in group:
            low, high = r.interval()
            axis.errorbar(r.flops, r.accuracy, yerr=[[r.accuracy - low], [high - r.accuracy]], fmt=markers[r.encoder],
                          color=colour, ecolor=colour, alpha=0.9, capsize=3, markersize=7)
        front = sorted((r for r in group if r.pareto), key=lambda r: r.flops)
        axis.plot([r.flops for r in front], [r.accuracy for r in front], "-", color=colour, alpha=0.6)
    handles = [Line2D([], [], color=METHOD_COLOURS.get(m, "tab:gray"), marker="o", linestyle="-", label=m)
               for m in sorted({r.method for r in rows})]
    handles += [Line2D([], [], color="black", marker=markers[e], linestyle="", label=e) for e in encoders]
    axis.legend(handles=handles, fontsize=7, loc="best")
    axis.set_xscale("log")
    axis.set_xlabel("pretraining FLOPs")
    axis.set_ylabel(f"{label} (95% interval)")
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    plot = out / "flops_vs_accuracy.png"
    figure.savefig(plot, dpi=120)
    plt.close(figure)
    return table, plot


def run_report(tracking_uri: str, experiment: str, out: Path, metric: Optional[str] = None):
    client = MlflowClient(tracking_uri)
    rows, label = collect(client, experiment, metric)
    table, plot = write_report(rows, label, out, f"{experiment}: {label} vs pretraining FLOPs, by method and encoder")
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = start_or_resume(client, experiment_id, f"report-{experiment}", {KIND: "report"})
    logger = RunLogger(tracking_uri, run.info.run_id)
    logger.artifacts([table, plot], "report")
    client.set_terminated(run.info.run_id, "FINISHED")
    return rows, label, table, plot, run.info.run_id
