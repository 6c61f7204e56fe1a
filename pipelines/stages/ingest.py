"""How a stage's datasets reach its Ray Train workers.

Ray Train's DatasetManager actor, started again by every stage, unpickles this config and
so imports this module: it imports Ray only. Importing it from the stage driver module
(torch through Ray's TorchTrainer, MLflow, rich) cost every stage seconds of CPU there.
"""

from __future__ import annotations

import ray.train


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
