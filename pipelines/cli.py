"""The ``mixmae`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, help="MixMAE pretraining and transfer on Ray + MLflow.")
console = Console()


@app.command()
def flops(
    model: str = typer.Argument(..., help="variant name, e.g. mixmae_swin_base_w14"),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="input size (default: the variant's)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Parameters and GFLOPs (multiply-adds, paper convention) of encoder + 1000-class head,
    and training FLOPs per image of the pretraining model."""
    from mixmae_core.flops import flop_report

    report = flop_report(model, img_size)
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
        return
    table = Table(title=f"{model} @ {report.img_size}px")
    for col in ("params (M)", "GFLOPs (MACs)", "pretrain params (M)", "train GFLOP / image"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{report.params_m:.1f}", f"{report.gflops:.2f}", f"{report.pretrain_params_m:.1f}",
        f"{report.train_gflops_per_image:.1f}",
    )
    console.print(table)


@app.command()
def convert(
    src: Path = typer.Argument(..., exists=True, dir_okay=False, help="official MixMIM checkpoint (.pth)"),
    dst: Path = typer.Argument(..., help="output .safetensors"),
) -> None:
    """Convert an official Sense-X/MixMIM checkpoint to this project's layout (safetensors)."""
    from mixmae_core.checkpoint import convert_official, is_official, load_state_dict, save_state_dict

    state = load_state_dict(src)
    if not is_official(state):
        raise typer.BadParameter(f"{src} does not look like an official MixMIM checkpoint", param_hint="SRC")
    converted = convert_official(state)
    kind = "pretraining" if any(k.startswith("decoder.") for k in converted) else "classifier"
    save_state_dict(dst, converted, {"source": str(src), "layout": kind})
    console.print(f"wrote {dst} ({kind}, {len(converted)} tensors)")


def main() -> None:
    app()
