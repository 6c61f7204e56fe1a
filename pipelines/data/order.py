"""Ordering and pairing: which images a training epoch reads, in which order, in which pairs.

Epochs. A training dataset draws a fresh order (and, for pretraining, a fresh pairing) on
every execution: execution ``k`` of a dataset built with ``epoch=e`` is epoch ``e + k``, and
everything random in it is a function of ``(seed, epoch)`` only. A Ray Train shard
executes it once per ``iter_torch_batches`` call, so ``for epoch ...: for batch in
shard.iter_torch_batches(...)`` sees epochs ``e, e + 1, ...``. When resuming, build the
dataset with ``epoch=`` the first epoch still to run. Executing the dataset (or one derived
from it) outside the training loop, e.g. ``count()``, also advances the epoch.

Units. The shuffled sequence is cut into units (single rows, or pairs for pretraining); a
unit travels as one Ray Data row, so no block split, shuffle or ``streaming_split`` can
separate a pair. For a manifest the units are emitted straight from a per-epoch
permutation (streaming, nothing moves but paths). Packed shards hold the bytes, so
partners are brought together with a sort-based group-by on the unit (one exchange of the
encoded bytes per epoch); both give identical units for the same ``(seed, epoch)``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.context import ShuffleStrategy

from pipelines.config import RaySettings
from pipelines.data.manifest import DataSource
from pipelines.data.ray_internals import execution_index

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


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


@lru_cache(maxsize=4)
def _unit_seeds(n_units: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1]).integers(0, 2**63 - 1, n_units, dtype=np.int64)


@lru_cache(maxsize=4)
def _position_lookup(ids: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids and their manifest positions; ``ids`` travel as bytes so the cache can key on them."""
    values = np.frombuffer(ids, np.int64)
    sorter = np.argsort(values, kind="stable")
    return values[sorter], sorter


def _units(rows: pa.Table, unit_idx: np.ndarray, group: int, seeds: Optional[np.ndarray], epoch: int) -> dict:
    """``rows`` hold consecutive units of ``group`` rows each; one output row per unit."""
    out: dict[str, np.ndarray] = {}
    for name in rows.column_names:
        values = rows.column(name).to_numpy(zero_copy_only=False)
        if group == 1:
            out[name] = values
        else:
            for j, suffix in enumerate(PAIR[:group]):
                out[name + suffix] = values[j::group]
    out["seed"] = seeds[unit_idx] if seeds is not None else np.zeros(len(unit_idx), np.int64)
    out["epoch"] = np.full(len(unit_idx), epoch, np.int64)
    return out


def units_for_chunk(table: pa.Table, c: int, *, chunk: int, group: int, shuffle: bool, seed: int, epoch: int) -> dict:
    """Units ``[c*chunk, (c+1)*chunk)`` of ``table``'s order in ``epoch`` (manifest order
    when not ``shuffle``) as a numpy batch: what the pipeline decodes for that chunk."""
    n_units = table.num_rows // group
    unit_idx = np.arange(c * chunk, min(n_units, (c + 1) * chunk))
    rows_idx = (unit_idx[:, None] * group + np.arange(group)).ravel()
    if not shuffle:
        return _units(table.take(rows_idx), unit_idx, group, None, epoch)
    rows = table.take(_epoch_order(table.num_rows, seed, epoch)[rows_idx])
    return _units(rows, unit_idx, group, _unit_seeds(n_units, seed, epoch), epoch)



def _emit_units(batch: dict, *, table: Any, shuffle: bool, epoch0: int, **kwargs: Any) -> dict:
    table = ray.get(table[0])
    epoch = epoch0 + execution_index() if shuffle else epoch0
    parts = [units_for_chunk(table, int(c), shuffle=shuffle, epoch=epoch, **kwargs) for c in batch["id"]]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _rank_rows(batch: pa.Table, *, ids: Any, group: int, seed: int, epoch0: int, n_buckets: int) -> pa.Table:
    """Packed rows tagged with their rank in this epoch's order and the bucket of their unit."""
    epoch = epoch0 + execution_index()
    sorted_ids, sorter = _position_lookup(ray.get(ids[0]))
    n = len(sorted_ids)
    rank = np.empty(n, np.int64)
    rank[_epoch_order(n, seed, epoch)] = np.arange(n)
    positions = sorter[np.searchsorted(sorted_ids, batch.column("image_id").to_numpy())]
    ranks = rank[positions]
    keep = ranks < (n // group) * group  # an odd image out sits this epoch out
    ranks = ranks[keep]
    batch = batch.filter(pa.array(keep)).append_column("_rank", pa.array(ranks))
    batch = batch.append_column("_bucket", pa.array((ranks // group) % n_buckets))
    return batch.append_column("_epoch", pa.array(np.full(len(ranks), epoch, np.int64)))


def _zip_units(group_rows: pa.Table, *, group: int, seed: int, n_units: int) -> dict:
    rows = group_rows.sort_by("_rank")
    unit_idx = rows.column("_rank").to_numpy()[::group] // group
    epoch = int(rows.column("_epoch")[0].as_py())
    return _units(rows.drop_columns(["_rank", "_epoch", "_bucket"]), unit_idx, group, _unit_seeds(n_units, seed, epoch), epoch)


def _read_shards(batch: dict, *, columns: list[str], split: str) -> Iterator[pa.Table]:
    """The ``split`` rows of the packed shards named in ``batch``, one row group at a time."""
    for path in batch["file"]:
        shard = pq.ParquetFile(str(path))
        for i in range(shard.num_row_groups):
            rows = shard.read_row_group(i, columns=columns + ["split"])
            rows = rows.filter(pc.field("split") == split).drop_columns(["split"])
            if rows.num_rows:
                yield rows


def _as_units(batch: pa.Table, *, epoch: int) -> dict:
    return _units(batch, np.arange(batch.num_rows), 1, None, epoch)


def _cluster_cpus() -> int:
    if not ray.is_initialized():
        ray.init(address=RaySettings().cluster() or "local")
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def units_per_task(n_units: int, group: int, cpus: int, max_units: int) -> int:
    """Units one decode task handles: the split is cut into waves of one task per CPU,
    as few waves as ``max_units`` allows, so tasks are long (few scheduling gaps) and of
    equal size (the cores finish an epoch together rather than one core finishing it
    alone); never below :data:`MIN_TASK_IMAGES` (a task must be worth starting)."""
    waves = math.ceil(n_units / (cpus * max_units))
    return min(max_units, max(math.ceil(MIN_TASK_IMAGES / group), math.ceil(n_units / (cpus * waves))))


def unit_stream(
    source: DataSource,
    split: str,
    columns: list[str],
    *,
    group: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    max_packed_units: int,
) -> tuple["ray.data.Dataset", Optional[int]]:
    """The split's rows as a dataset of units (see module docstring) and the batch size the
    decoding step should use on it."""
    if source.packed:
        columns = columns + ["image_bytes"] + (["annotation_bytes"] if source.annotation_kind == "label_map" else [])
    ids = source.table(split, ["image_id"]).column("image_id").to_numpy()
    if len(ids) < group:
        raise ValueError(f"split {split!r} of {source.files[0]} has {len(ids)} images; need at least {group}")
    n_units = len(ids) // group
    max_units = max_packed_units if source.packed else math.ceil(MAX_TASK_IMAGES / group)
    per_task = units_per_task(n_units, group, _cluster_cpus(), max_units)
    if not source.packed:
        table_ref = ray.put(source.table(split, columns))
        n_chunks = math.ceil(n_units / per_task)
        ds = ray.data.from_items([{"id": c} for c in range(n_chunks)], override_num_blocks=n_chunks).map_batches(
            _emit_units,
            batch_size=1,
            fn_kwargs=dict(table=[table_ref], group=group, shuffle=shuffle, seed=seed, epoch0=epoch, chunk=per_task),
        )
        # Whole blocks: a batch size here would be fused into the emitting step's input
        # bundling and pack many chunks into one task, serialising the decode.
        return ds, None
    # Shards are read by plain tasks: ray.data.read_parquet lists files in a task that
    # needs a fresh worker process (seconds of imports) on every execution, i.e. every epoch.
    ds = ray.data.from_items([{"file": f} for f in source.files], override_num_blocks=len(source.files))
    ds = ds.map_batches(_read_shards, batch_size=1, fn_kwargs=dict(columns=columns, split=split))
    if not shuffle:
        return ds.map_batches(_as_units, batch_format="pyarrow", fn_kwargs=dict(epoch=epoch)), per_task
    metadata = [pq.read_metadata(f) for f in source.files]
    encoded = sum(m.row_group(i).total_byte_size for m in metadata for i in range(m.num_row_groups))
    n_buckets = max(1, min(n_units, max(math.ceil(n_units / per_task), math.ceil(encoded / _GROUP_BYTES))))
    ds = ds.map_batches(
        _rank_rows,
        batch_format="pyarrow",
        fn_kwargs=dict(
            ids=[ray.put(ids.astype(np.int64).tobytes())], group=group, seed=seed, epoch0=epoch, n_buckets=n_buckets
        ),
    )
    # The default hash shuffle starts aggregator actors per partition: far slower on small clusters.
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ds = ds.groupby("_bucket").map_groups(
        _zip_units, batch_format="pyarrow", fn_kwargs=dict(group=group, seed=seed, n_units=n_units)
    )
    return ds, per_task

