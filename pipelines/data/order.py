"""Ordering and pairing: which images each training worker reads, in which order, in which pairs.

What a worker reads is a :class:`Shard`: its part of one epoch of a split, from a position
on. Everything in it is a function of ``(seed, epoch, rank, world size)`` and the data: no
timing, no restart and no other worker changes it, so two runs with one seed train every
step on the same images, pairs, crops and masks, and a run resumed from a checkpoint
continues at the checkpoint's position without reading what it trained on.

Units. An epoch's order is cut into units (single rows, or pairs for pretraining); a unit
travels as one Ray Data row, so nothing can separate a pair, and carries its ``position``
in the worker's shard (what a checkpoint records).

Manifests. The epoch's order is one permutation of the split (seeded by ``(seed, epoch)``),
cut into units; consecutive blocks of ``block`` units (one worker's micro-batch) are dealt
to the workers in turn, so the units of a global optimizer step are the same run after
run. Only the path column moves: a worker's decode tasks read their files themselves.
Evaluation reads the split in manifest order, each worker a contiguous slice.

Packed shards hold the bytes, so a worker reads only its own row groups: each epoch the
row groups are permuted and dealt to the workers in turn (evaluation: contiguous), and a
worker permutes and pairs the rows it got with a sort-based exchange of their bytes. With
one worker this is exactly the manifest's order; with several it is another order, as
random. A resumed worker still reads its row groups, but decodes only the units it has
not trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.data.manifest import DataSource, parquet_file, read_parquet

#: Column suffixes of the two images of a pair (rows 2k and 2k+1 of a collated batch).
PAIR = ("_a", "_b")
#: Target encoded bytes per group when packed shards are regrouped into units.
_GROUP_BYTES = 64 * 2**20
#: Fewest images per decode task: below this, Ray's per-task cost (scheduling, arguments,
#: the skip counts it sends) outweighs the decoding on small datasets.
MIN_TASK_IMAGES = 32
#: Most images per decode task read from a manifest (about 10 s of decoding at 224 px):
#: a core idles between two tasks (Ray Data polls for finished tasks every 0.1 s), so
#: tasks are long, but bounded so a retried task redoes little. Packed shards are bounded
#: by the builder's ``max_packed_units`` (their task input is the encoded bytes).
MAX_TASK_IMAGES = 2048


@dataclass(frozen=True)
class Shard:
    """What one worker reads of a split: its part of epoch ``epoch``'s order, units
    ``[start, limit)`` of it (``limit`` None: to the end)."""

    rank: int = 0
    world: int = 1
    epoch: int = 0
    start: int = 0
    """Units of this part already trained on (a checkpoint's position)."""
    limit: Optional[int] = None
    """Units of this part to read in all: a training epoch ends at its last full optimizer step."""
    block: int = 1
    """Units dealt to a worker at a time (its micro-batch): a global step reads one block of each."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not one of {self.world} workers")


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


@lru_cache(maxsize=4)
def _unit_seeds(n_units: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1]).integers(0, 2**63 - 1, n_units, dtype=np.int64)


@lru_cache(maxsize=8)
def shard_units(n_units: int, shard: Shard, shuffle: bool) -> np.ndarray:
    """The epoch's unit indices a worker reads, in its order (``[start:limit]`` not applied):
    training, blocks ``rank, rank + world, ...`` of the epoch's units; evaluation, its
    contiguous slice of the split."""
    if not shuffle:
        return np.arange(shard.rank * n_units // shard.world, (shard.rank + 1) * n_units // shard.world)
    blocks = np.arange(shard.rank, math.ceil(n_units / shard.block), shard.world)
    units = (blocks[:, None] * shard.block + np.arange(shard.block)).ravel()
    return units[units < n_units]


def _units(rows: pa.Table, group: int, seeds: Optional[np.ndarray], epoch: int, positions: np.ndarray) -> dict:
    """``rows`` hold consecutive units of ``group`` rows each; one output row per unit."""
    out: dict[str, np.ndarray] = {}
    for name in rows.column_names:
        values = rows.column(name).to_numpy(zero_copy_only=False)
        if group == 1:
            out[name] = values
        else:
            for j, suffix in enumerate(PAIR[:group]):
                out[name + suffix] = values[j::group]
    out["seed"] = seeds if seeds is not None else np.zeros(len(positions), np.int64)
    out["epoch"] = np.full(len(positions), epoch, np.int64)
    out["position"] = np.asarray(positions, np.int64)
    return out


def chunk_units(table: pa.Table, shard: Shard, c: int, *, chunk: int, group: int, shuffle: bool, seed: int) -> dict:
    """Units ``[start + c*chunk, start + (c+1)*chunk)`` of ``shard`` (a manifest's ``table``, the
    split's rows in manifest order) as a numpy batch: what one decode task decodes."""
    n_units = table.num_rows // group
    units = shard_units(n_units, shard, shuffle)
    end = len(units) if shard.limit is None else min(len(units), shard.limit)
    positions = np.arange(shard.start + c * chunk, min(end, shard.start + (c + 1) * chunk))
    picked = units[positions]
    rows_idx = (picked[:, None] * group + np.arange(group)).ravel()
    if not shuffle:
        return _units(table.take(rows_idx), group, None, shard.epoch, positions)
    rows = table.take(_epoch_order(table.num_rows, seed, shard.epoch)[rows_idx])
    return _units(rows, group, _unit_seeds(n_units, seed, shard.epoch)[picked], shard.epoch, positions)


def _emit_units(batch: dict, *, table: Any, **kwargs: Any) -> dict:
    table = ray.get(table[0])
    parts = [chunk_units(table, c=int(c), **kwargs) for c in batch["chunk"]]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def task_resources(cpus: float) -> dict[str, float]:
    """What each of a dataset's tasks asks Ray for when its worker may plan with ``cpus``: a
    share of one CPU below one (its tasks are scheduled within the share, one at a time),
    else Ray's default of one."""
    return {"num_cpus": cpus} if cpus < 1 else {}


def units_per_task(n_units: int, group: int, cpus: float, max_units: int) -> int:
    """Units one decode task handles: the shard is cut into waves of one task per whole CPU
    (one below one), as few waves as ``max_units`` allows, so tasks are long (few scheduling
    gaps) and of equal size (the cores finish an epoch together rather than one core finishing
    it alone); never below :data:`MIN_TASK_IMAGES` (a task must be worth starting)."""
    cores = max(1, math.floor(cpus))
    waves = max(1, math.ceil(n_units / (cores * max_units)))
    return min(max_units, max(math.ceil(MIN_TASK_IMAGES / group), math.ceil(n_units / (cores * waves))))


# --------------------------------------------------------------------------- packed shards


@dataclass(frozen=True)
class _PackedIndex:
    """The split's rows of every packed shard, in file order: their ids and row groups."""

    ids: np.ndarray
    row_group: np.ndarray
    """Global row-group index of each row."""
    row_groups: tuple[tuple[str, int], ...]
    """``(file, index in the file)`` of each global row group."""
    encoded_bytes: int


@lru_cache(maxsize=4)
def _packed_index(files: tuple[str, ...], split: str) -> _PackedIndex:
    ids, groups, row_groups, encoded = [], [], [], 0
    for path in files:
        metadata = parquet_file(path).metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        columns = read_parquet(path, columns=["image_id", "split"])
        in_split = pc.equal(columns.column("split"), split).to_numpy(zero_copy_only=False)
        first = len(row_groups)
        ids.append(columns.column("image_id").to_numpy()[in_split])
        groups.append(np.repeat(np.arange(first, first + len(sizes)), sizes)[in_split])
        row_groups += [(path, i) for i in range(len(sizes))]
        encoded += sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    return _PackedIndex(np.concatenate(ids), np.concatenate(groups), tuple(row_groups), encoded)


def _packed_part(index: _PackedIndex, shard: Shard, shuffle: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The global row groups a worker reads and the ids of its rows in file order."""
    n = len(index.row_groups)
    if shuffle:
        mine = np.sort(np.random.default_rng([seed, shard.epoch, 2]).permutation(n)[shard.rank :: shard.world])
    else:
        mine = np.arange(shard.rank * n // shard.world, (shard.rank + 1) * n // shard.world)
    return mine, index.ids[np.isin(index.row_group, mine)]


def _part_rngs(shard: Shard, seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Generators of a worker's row order and unit seeds; one worker's are the manifest's."""
    if shard.world == 1:
        return np.random.default_rng([seed, shard.epoch]), np.random.default_rng([seed, shard.epoch, 1])
    key = [seed, shard.epoch, shard.world, shard.rank]
    return np.random.default_rng(key), np.random.default_rng([*key, 1])


def _read_shards(batch: dict, *, columns: list[str], split: str) -> Iterator[pa.Table]:
    """The ``split`` rows of the row groups named in ``batch``, one row group at a time."""
    for path, index in zip(batch["file"], batch["row_group"]):
        rows = parquet_file(str(path)).read_row_group(int(index), columns=columns + ["split"])
        rows = rows.filter(pc.field("split") == split).drop_columns(["split"])
        if rows.num_rows:
            yield rows


def _rank_rows(batch: pa.Table, *, order: Any, group: int, units_per_bucket: int, start: int, end: int) -> pa.Table:
    """Rows tagged with their rank in the worker's order and the bucket of their unit;
    rows of units outside ``[start, end)`` dropped (trained on already, or past the quota)."""
    sorted_ids, ranks_sorted = ray.get(order[0])
    ranks = ranks_sorted[np.searchsorted(sorted_ids, batch.column("image_id").to_numpy())]
    units = ranks // group
    keep = (units >= start) & (units < end)
    batch = batch.filter(pa.array(keep)).append_column("_rank", pa.array(ranks[keep]))
    return batch.append_column("_bucket", pa.array((units[keep] - start) // units_per_bucket))


def _zip_units(group_rows: pa.Table, *, group: int, unit_seeds: Any, epoch: int) -> dict:
    rows = group_rows.sort_by("_rank")
    units = rows.column("_rank").to_numpy()[::group] // group
    seeds = ray.get(unit_seeds[0])[units] if unit_seeds[0] is not None else None
    return _units(rows.drop_columns(["_rank", "_bucket"]), group, seeds, epoch, units)


def _packed_stream(
    source: DataSource, split: str, columns: list[str], shard: Shard, *, group: int, shuffle: bool, seed: int,
    cpus: float, max_units: int,
) -> "ray.data.Dataset":
    index = _packed_index(source.files, split)
    mine, ids = _packed_part(index, shard, shuffle, seed)
    n_units = len(ids) // group
    end = n_units if shard.limit is None else min(n_units, shard.limit)
    order_rng, seeds_rng = _part_rngs(shard, seed)
    order = order_rng.permutation(len(ids)) if shuffle else np.arange(len(ids))
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    sorter = np.argsort(ids, kind="stable")
    unit_seeds = seeds_rng.integers(0, 2**63 - 1, n_units, dtype=np.int64) if shuffle else None
    todo = max(1, end - shard.start)
    per_task = units_per_task(todo, group, cpus, max_units)
    n_buckets = max(1, min(todo, max(math.ceil(todo / per_task), math.ceil(index.encoded_bytes / shard.world / _GROUP_BYTES))))
    ds = ray.data.from_items([{"file": index.row_groups[g][0], "row_group": index.row_groups[g][1]} for g in mine],
                             override_num_blocks=max(1, len(mine)))
    ds = ds.map_batches(_read_shards, batch_size=1, fn_kwargs=dict(columns=columns, split=split), **task_resources(cpus))
    ds = ds.map_batches(
        _rank_rows, batch_format="pyarrow", **task_resources(cpus),
        fn_kwargs=dict(order=[ray.put((ids[sorter], rank[sorter]))], group=group, start=shard.start, end=end,
                       units_per_bucket=math.ceil(todo / n_buckets)),
    )
    from ray.data.context import ShuffleStrategy  # Ray Data's import costs `mixmae plan` (which reads Shard) 0.7 s

    # The default hash shuffle starts aggregator actors per partition: far slower on small clusters.
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ds = ds.groupby("_bucket").map_groups(
        _zip_units, batch_format="pyarrow", **task_resources(cpus),
        fn_kwargs=dict(group=group, unit_seeds=[None if unit_seeds is None else ray.put(unit_seeds)], epoch=shard.epoch),
    )
    return ds, per_task


# --------------------------------------------------------------------------- either source


def unit_stream(
    source: DataSource,
    split: str,
    columns: list[str],
    shard: Shard,
    *,
    group: int,
    shuffle: bool,
    seed: int,
    max_packed_units: int,
    cpus: float,
) -> tuple["ray.data.Dataset", Optional[int]]:
    """A worker's shard of the split as a dataset of units (see module docstring), in order,
    and the batch size the decoding step should use on it. ``cpus``: what the worker's
    decode tasks may use (it sizes the tasks)."""
    if source.packed:
        columns = columns + ["image_bytes"] + (["annotation_bytes"] if source.annotation_kind == "label_map" else [])
        return _packed_stream(source, split, columns, shard, group=group, shuffle=shuffle, seed=seed, cpus=cpus,
                              max_units=max_packed_units)
    table = source.table(split, columns)
    if table.num_rows < group:
        raise ValueError(f"split {split!r} of {source.files[0]} has {table.num_rows} images; need at least {group}")
    available = len(shard_units(table.num_rows // group, shard, shuffle))
    todo = max(0, (available if shard.limit is None else min(available, shard.limit)) - shard.start)
    per_task = units_per_task(max(todo, 1), group, cpus, math.ceil(MAX_TASK_IMAGES / group))
    n_chunks = math.ceil(todo / per_task)
    ds = ray.data.from_items([{"chunk": c} for c in range(n_chunks)], override_num_blocks=max(1, n_chunks))
    ds = ds.map_batches(
        _emit_units,
        batch_size=1,
        **task_resources(cpus),
        fn_kwargs=dict(table=[ray.put(table)], shard=shard, group=group, shuffle=shuffle, seed=seed, chunk=per_task),
    )
    # Whole blocks: a batch size here would be fused into the emitting step's input
    # bundling and pack many chunks into one task, serialising the decode.
    return ds, None
