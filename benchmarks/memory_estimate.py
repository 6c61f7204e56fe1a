"""The memory plan's estimates (``pipelines/memory.py`` and ``worker_memory.py``, what
``mixmae plan`` prints) against measured peaks.

CPU rows: MixMAE pretraining steps in fp32 of the micro and the tiny Swin, with and without
activation checkpointing. The activations estimated on the meta device (measured at batch 2,
scaled to the row's batch) against the peak of the tensors live during a real forward and
backward on this CPU (the weights not counted; the gradients backward makes are). The
peak should lie between the estimate and the estimate plus the gradients: the plan's
bound, which adds them.

GPU rows: one Swin-B/W14 pretraining step at batch 128 in bf16 on one GPU, as
``benchmarks/pretrain_throughput.py`` times it: the plan's total (weights, gradients,
AdamW states, activations as CUDA runs them) for its reference path (eager, SDPA with the
mask as a bias, foreach AdamW) and its fast path without torch.compile (per-image groups,
fused AdamW). ``--gpu-json`` (that benchmark's ``--out``) adds its measured peaks.

    python benchmarks/memory_estimate.py [--gpu-json result.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from mixmae_core.fast import StepOptions, apply_step_options
from mixmae_core.methods import create_pretraining_model
from pipelines.memory import check_pretraining_peak, measure_model, pretraining_inputs
from pipelines.worker_memory import GIB

CPU_ROWS = [("mixmae_swin_micro_w8", 64, 8), ("mixmae_swin_micro_w8", 64, 32), ("mixmae_swin_tiny_w14", 224, 2),
            ("mixmae_swin_tiny_w14", 224, 8)]
GPU_PATHS = {"reference": StepOptions(attn_impl="sdpa"), "fast": StepOptions.fast(torch.device("cuda"))}


def cpu_table() -> Table:
    mib = 2**20
    cpu = platform.processor() or platform.machine()
    table = Table(title=f"CPU ({cpu}), fp32: estimate against measured peak (MiB)")
    for column in ("model", "px", "batch", "checkpointing", "activations (estimate)", "gradients", "measured peak",
                   "peak / estimate", "peak / (estimate + gradients)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for encoder, img_size, batch in CPU_ROWS:
        for checkpointing in (False, True):
            check = check_pretraining_peak(encoder, img_size, batch, checkpointing)
            table.add_row(
                encoder, str(img_size), str(batch), "on" if checkpointing else "off", f"{check.activations / mib:,.1f}",
                f"{check.gradients / mib:,.1f}", f"{check.measured / mib:,.1f}",
                f"{check.measured / check.activations:.2f}",
                f"{check.measured / (check.activations + check.gradients):.2f}",
            )
    return table


def gpu_table(measured: dict) -> Table:
    table = Table(title="one GPU, bf16: Swin-B/W14 pretraining at batch 128, the plan's total (GiB)")
    for column in ("path", "weights", "gradients", "AdamW", "activations", "plan total", "measured peak"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, options in GPU_PATHS.items():
        with torch.device("meta"):
            model = create_pretraining_model("mixmae", "mixmae_swin_base_w14", img_size=224)
        model = apply_step_options(model, replace(options, compile="off"))
        costs = measure_model(model, pretraining_inputs(model, 224), lambda x, m: model(x, m).loss, cuda=True, bf16=True)
        memory = costs.worker(128, workers=1, optimizer="adamw", fused=options.fused_adamw, checkpointing=False)
        peak = measured.get("rows", {}).get(name, {}).get("peak_gib")
        table.add_row(
            name + ("" if name == "reference" else " (eager)"), f"{memory.weights / GIB:.2f}",
            f"{memory.gradients / GIB:.2f}", f"{memory.optimizer / GIB:.2f}", f"{memory.activations / GIB:.2f}",
            f"{memory.total() / GIB:.2f}", "n/a" if peak is None else f"{peak:.2f} ({measured['device']})",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-json", help="benchmarks/pretrain_throughput.py --out of Swin-B/W14 at batch 128")
    args = parser.parse_args()
    measured = json.load(open(args.gpu_json)) if args.gpu_json else {}
    console = Console(width=200)
    console.print(f"{datetime.date.today().isoformat()}, torch {torch.__version__}")
    console.print(cpu_table())
    console.print(gpu_table(measured))


if __name__ == "__main__":
    main()
