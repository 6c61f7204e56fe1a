"""Every private Ray API this project touches, why it needs it, and what to rerun when Ray changes.

Each use below is a knob with no public equivalent in the pinned Ray (2.60). When Ray is
upgraded, rerun ``python benchmarks/data_throughput.py`` (Ray Data against a DataLoader
doing the same work, per core) and ``pytest -m ray tests/test_data_pipeline.py`` (order,
pairing, resume); the README's data figures say what to expect.

* ``DataContext._max_num_blocks_in_streaming_gen_buffer`` (:func:`configure_execution`): how
  many finished blocks a decode task may hold before it pauses in ``yield``.
* ``ResourceManager.DEFAULT_OBJECT_STORE_MEMORY_LIMIT_FRACTION_NO_RESERVATION``
  (:func:`configure_execution`): the share of the object store an executor plans with, which
  each of a stage's workers divides (every worker executes its own dataset).

* ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (:func:`in_ray_job`): the variable Ray's job manager sets
  for a job's entrypoint. A runtime env given to ``ray.init`` there is merged with the job's,
  and refused when both name one variable; the job's already reaches every process of it.

The public ``DataContext`` fields set in :func:`configure_execution` live here too, because
they were tuned together with the private one and are measured by the same benchmark.
"""

from __future__ import annotations

import os
from typing import Optional

from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
from ray.data import DataContext, ExecutionOptions, ExecutionResources
from ray.data._internal.execution.resource_manager import ResourceManager

#: Blocks a decode task may have waiting for the driver before it pauses (Ray's default: 2).
STREAM_GEN_BUFFER_BLOCKS = 8
#: Decoded bytes the pipeline may hold ready, as a multiple of what its consumer has
#: prefetched, before Ray Data stops reading its decode tasks' output (Ray's default: 2).
DOWNSTREAM_QUEUE_RATIO = 8.0


def configure_execution(ctx: DataContext, block_bytes: Optional[int], cpus: float, share: float = 1.0) -> None:
    """Settings for a worker's dataset: long decode tasks that stream ``block_bytes`` blocks
    (None: leave the block settings alone, for packed shards, whose read and shuffle would
    otherwise be cut into tiny blocks) to one consumer, in order, within ``cpus`` and
    ``share`` of the object store Ray Data would plan with.

    * Blocks come out in the order of the shard (``preserve_order``): what a step trains on
      must not depend on which decode task finished first. Decode tasks are long and of
      equal size, so a task's blocks rarely wait for its predecessor's.
    * Every worker of a stage executes its own dataset, so each executor gets its share of
      the CPUs and object store (Ray Data would otherwise plan with the whole cluster's).
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
    ctx.override_object_store_memory_limit_fraction = (
        share * ResourceManager.DEFAULT_OBJECT_STORE_MEMORY_LIMIT_FRACTION_NO_RESERVATION
    )
    ctx.execution_options = ExecutionOptions(
        resource_limits=ExecutionResources.for_limits(cpu=cpus), preserve_order=True,
        verbose_progress=ctx.execution_options.verbose_progress,
    )
    ctx.downstream_capacity_backpressure_ratio = DOWNSTREAM_QUEUE_RATIO
    ctx.op_resource_reservation_enabled = False


def in_ray_job() -> bool:
    """Whether this process is a Ray job's entrypoint (``ray job submit``, a KubeRay RayJob)."""
    return RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ
