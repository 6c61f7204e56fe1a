"""Pretraining input pipeline throughput: Ray Data vs a torch DataLoader, per CPU core.

Both sides run the same work on the same files, in the same order: the epoch's pairing,
decode (``decode_image``), RandomResizedCrop(0.2-1, bicubic) + flip per image, one mixing
mask per pair, and ``PairCollate`` into ``(2P, 3, S, S)`` uint8 batches, delivered in the
epoch's order (as a training worker reads its shard; a DataLoader keeps its order too). Ray
Data gets a local cluster of N CPUs and builds each epoch's dataset as a worker does; the
DataLoader gets N worker processes. One warm-up epoch each
(worker start-up and imports), then the timed epochs, Ray and DataLoader epochs
alternating (and which of the two goes first alternating too) so both see the same
background load. Rates are medians over the epochs; ratios are medians of the per-epoch
ratios (a Ray epoch against the DataLoader epoch next to it), which cancels most of a
shared machine's drifting load, with the lowest and highest per-epoch ratio beside them.
Run it on an otherwise idle machine: a busy process beside it, even at nice 19, skews the
ratio against the side with more processes to schedule (the README's data figures). Images
per CPU-second (all processes of the run: driver, Ray daemons and workers, DataLoader
workers) is shown too.

Every epoch is a new Ray Data dataset and execution (its own order and pairing), which
leaves the cores idle for a moment at the epoch's boundary: nothing on a real dataset,
several percent on a 600-image epoch (the README's data figures).

    python benchmarks/data_throughput.py [--images 2400] [--epochs 7] [--img-size 224] [--cores 1 2]
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from mixmae_core.masking import MaskSpec
from pipelines.data.collate import PairCollate
from pipelines.data.datasets import pretrain_dataset
from pipelines.data.order import Shard, chunk_units
from pipelines.data.samples import decode_pairs
from pipelines.data.manifest import build_manifest, open_source, write_manifest

PAIRS_PER_BATCH = 16
PAIRS_PER_CHUNK = 16


def write_photos(root: Path, count: int, size=(500, 375)) -> None:
    """JPEGs of ImageNet's typical size with photo-like statistics (gradients, shapes, grain)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    for i in range(count):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (x / size[0])[..., None]
        pixels = a * (1 - t) + b * t + rng.normal(0, 8, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            cx, cy, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(10, 80)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        folder = root / "train" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        (folder / f"{i:05d}.jpg").write_bytes(buf.getvalue())


class PairChunks(torch.utils.data.Dataset):
    """The same pairing and decode as the Ray pipeline; item ``(epoch, c)`` is chunk ``c``."""

    def __init__(self, manifest: Path, img_size: int) -> None:
        self.table = open_source(manifest).table("train", ["image_id", "path"])
        self.img_size = img_size

    def chunks(self) -> int:
        return -(-(self.table.num_rows // 2) // PAIRS_PER_CHUNK)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, c = item
        units = chunk_units(self.table, Shard(epoch=epoch), c, chunk=PAIRS_PER_CHUNK, group=2, shuffle=True, seed=0)
        blocks = list(decode_pairs(units, img_size=self.img_size, masks=MaskSpec((self.img_size // 32,) * 2, 0.5, "shared")))
        return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, chunk)``; lives in the main process, so persistent workers see new epochs."""

    def __init__(self, chunks: int) -> None:
        self.num_chunks, self.epoch = chunks, 0

    def __iter__(self):
        return iter([(self.epoch, c) for c in range(self.num_chunks)])

    def __len__(self) -> int:
        return self.num_chunks


def tree_cpu_seconds() -> float:
    """CPU time used so far by this process and every live descendant (Ray's daemons and
    workers, DataLoader workers): the cost side of images per CPU-second."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(manifest: Path, cores: int, img_size: int, epochs: int) -> dict[str, dict[str, list[float]]]:
    """Per timed epoch, for Ray Data and for the DataLoader: images per wall-clock second and
    per CPU-second of the whole process tree. Epochs alternate between the two so both see
    the same background load; one untimed warm-up epoch each."""
    import ray

    ray.init(address="local", num_cpus=cores, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        dataset = PairChunks(manifest, img_size)
        sampler = EpochSampler(dataset.chunks())
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=sampler, num_workers=cores, persistent_workers=True,
            collate_fn=PairCollate(), multiprocessing_context="forkserver",  # no fork of a Ray driver
        )
        runs = {
            "ray": lambda: pretrain_dataset(manifest, img_size=img_size, seed=0, shard=Shard(epoch=sampler.epoch))
            .iter_torch_batches(batch_size=PAIRS_PER_BATCH, collate_fn=PairCollate()),
            "loader": lambda: loader,
        }
        rates = {name: {"wall": [], "cpu": []} for name in runs}
        for epoch in range(epochs + 1):
            sampler.epoch = epoch
            # Who goes first alternates, so a drifting machine speed favours neither side.
            for name, batches in list(runs.items())[:: 1 if epoch % 2 else -1]:
                start, cpu = time.perf_counter(), tree_cpu_seconds()
                images = sum(len(b["images"]) for b in batches())
                if epoch:
                    rates[name]["wall"].append(images / (time.perf_counter() - start))
                    rates[name]["cpu"].append(images / (tree_cpu_seconds() - cpu))
        return rates
    finally:
        ray.shutdown()


def ratio_with_range(ray_rates: list[float], loader_rates: list[float]) -> str:
    """The median of the per-epoch ratios and, in brackets, their lowest and highest: how far
    one epoch's comparison strays on this machine."""
    ratios = np.divide(ray_rates, loader_rates)
    return f"{np.median(ratios):.2f}x ({ratios.min():.2f}-{ratios.max():.2f})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", type=Path, default=None, help="where the JPEGs go (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = (args.workdir or Path(tmp)).absolute()
        write_photos(root / "photos", args.images)
        manifest = write_manifest(build_manifest("imagefolder", root / "photos", "train"), root / "photos.parquet")
        table = Table(
            title=f"MixMAE pretraining input, {args.images} JPEGs 500x375 -> {args.img_size}px pairs + masks, "
            f"medians of {args.epochs} epochs ({platform.machine()}, {os.cpu_count()} CPUs: {cpu_model()}; "
            f"{datetime.date.today()})"
        )
        columns = (
            "cores", "Ray Data img/s", "DataLoader img/s", "Ray img/s/core", "DataLoader img/s/core",
            "Ray / DataLoader", "Ray img/CPU-s", "DataLoader img/CPU-s", "Ray / DataLoader (CPU)",
        )
        for col in columns:
            table.add_column(col, justify="right")
        for cores in args.cores:
            rates = measure(manifest, cores, args.img_size, args.epochs)
            ray_wall, loader_wall = (float(np.median(rates[k]["wall"])) for k in ("ray", "loader"))
            ray_cpu, loader_cpu = (float(np.median(rates[k]["cpu"])) for k in ("ray", "loader"))
            wall_ratio, cpu_ratio = (ratio_with_range(rates["ray"][kind], rates["loader"][kind]) for kind in ("wall", "cpu"))
            table.add_row(
                str(cores), f"{ray_wall:.0f}", f"{loader_wall:.0f}", f"{ray_wall / cores:.0f}",
                f"{loader_wall / cores:.0f}", wall_ratio, f"{ray_cpu:.0f}", f"{loader_cpu:.0f}", cpu_ratio,
            )
        Console(width=200).print(table)


if __name__ == "__main__":
    main()
