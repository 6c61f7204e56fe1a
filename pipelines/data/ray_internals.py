"""Every private Ray API this project touches, why it needs it, and what to rerun when Ray changes.

Each use below is a knob with no public equivalent in the pinned Ray (2.60). When Ray is
upgraded, rerun ``python benchmarks/data_throughput.py`` (Ray Data against a DataLoader
doing the same work, per core) and ``pytest -m ray tests/test_data_pipeline.py`` (epochs,
pairing, resume); the README's data figures say what to expect.

* ``DataContext._execution_idx`` (:func:`execution_index`): Ray Data's own per-epoch
  reseeding keys on this counter; the streaming executor bumps it after each execution and
  ships it to tasks. A training dataset reads it to draw a fresh order and pairing every
  epoch from one lazily built dataset.
* ``DataContext._max_num_blocks_in_streaming_gen_buffer`` (:func:`tune_streaming`): how many
  finished blocks a decode task may hold before it pauses in ``yield``.
* ``DataConfig._resolve_execution_options`` (:class:`StageDataConfig`): the execution
  options Ray Train gives a dataset, reused for the datasets this config executes itself.

The public ``DataContext`` fields set in :func:`tune_streaming` live here too, because
they were tuned together with the private one and are measured by the same benchmark.

This module imports Ray only: Ray Train's DatasetManager actor unpickles
:class:`StageDataConfig` (so imports this module) in every stage, and torch, MLflow or
rich would cost it seconds.
"""

from __future__ import annotations

from typing import Optional

import ray
import ray.train
from ray.data import DataContext

#: Blocks a decode task may have waiting for the driver before it pauses (Ray's default: 2).
STREAM_GEN_BUFFER_BLOCKS = 8
#: Decoded bytes the pipeline may hold ready, as a multiple of what its consumer has
#: prefetched, before Ray Data stops reading its decode tasks' output (Ray's default: 2).
DOWNSTREAM_QUEUE_RATIO = 8.0


def execution_index() -> int:
    """How many times the dataset running this task was executed before: its epoch offset."""
    return DataContext.get_current()._execution_idx


def tune_streaming(ctx: DataContext, block_bytes: Optional[int]) -> None:
    """Settings for long decode tasks that stream ``block_bytes`` blocks to a trainer
    (None: leave the block settings alone, for packed shards, whose read and shuffle would
    otherwise be cut into tiny blocks).

    * Ray Data merges a task's yields into blocks up to ``target_max_block_size``; one yield
      per block lets the first images of a long task reach the consumer while it decodes.
    * The driver takes a task's next block only after a background thread fetched the
      previous block's metadata and a scheduling step (up to 0.1 s apart) emitted it, so a
      fast task outruns it; with Ray's buffer of 2 blocks a lone decode task sat blocked
      in ``yield`` for much of an epoch.
    * Ray Data's downstream-capacity policy weighs every live block of the last step
      (including those inside the consumer's iterator) against only what the consumer
      reports prefetched, so it throttled a consumer that kept up; at ratio 8 it never
      fires for one that keeps up and still bounds what a slow one lets pile up.
    * Per-operator reservations are sized from what Ray Data's autoscaler reserved for the
      execution, which starts at one CPU; every epoch is a new execution, so most of an
      epoch ran one decode task at a time. Object-store backpressure stays in force.
    """
    if block_bytes is not None:
        ctx.target_max_block_size = block_bytes
        ctx._max_num_blocks_in_streaming_gen_buffer = STREAM_GEN_BUFFER_BLOCKS
    ctx.downstream_capacity_backpressure_ratio = DOWNSTREAM_QUEUE_RATIO
    ctx.op_resource_reservation_enabled = False


class StageDataConfig(ray.train.DataConfig):
    """Ray Train's ingest, except that evaluation datasets are split with ``equal=False``
    (the default equal split drops up to ``world_size - 1`` rows to even the shards out)."""

    def __init__(self, train: list[str], evaluation: list[str]):
        super().__init__(datasets_to_split=train)
        self._evaluation = evaluation

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if world_size == 1:
            # One worker reads everything: the dataset executes in the worker itself, as
            # Ray Train does for unsplit datasets. A split would add a coordinator actor
            # per dataset (a process with seconds of start-up) for nothing.
            return [{name: self._own_copy(name, ds).iterator() for name, ds in datasets.items()}]
        rest = {k: v for k, v in datasets.items() if k not in self._evaluation}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        for name in (n for n in self._evaluation if n in datasets):  # Train may configure one dataset at a time
            for i, split in enumerate(self._own_copy(name, datasets[name]).streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output

    def _own_copy(self, name: str, ds: "ray.data.Dataset") -> "ray.data.Dataset":
        ds = ds.copy(ds)
        ds.set_name(name)
        ds.context.execution_options = self._resolve_execution_options(name)
        return ds
