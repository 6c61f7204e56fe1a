"""MLflow: tracking URI resolution, pipeline/stage runs, rank-0 logging from Ray workers.

Layout of an experiment: one parent run per pipeline (tag ``mixmae.kind=pipeline``), one
nested run per stage (``mixmae.stage=<name>``). Runs are found again by name, so the
same command with the same run name resumes instead of starting over.

Workers never use MLflow's global state (its active run is per process and Ray workers
chdir); they talk to the run by id through an ``MlflowClient``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

KIND = "mixmae.kind"
STAGE = "mixmae.stage"
COMPLETE = "mixmae.complete"
FAILED_REASON = "mixmae.failure"
ENCODER = "mixmae.encoder_checkpoint"
CHECKPOINT = "mixmae.checkpoint"
_MAX_PARAM = 6000


def resolve_tracking_uri(configured: Optional[str] = None, workdir: Optional[Path] = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the config's, else ``sqlite:///<workdir>/mlflow.db``.

    Relative SQLite paths become absolute: Ray workers run in another directory.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        uri = f"sqlite:///{(workdir or Path.cwd()).resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Optional[Path] = None) -> str:
    """Experiment id, creating it when missing. With a local store the artifact root is made
    absolute (MLflow's default, ./mlruns, would follow each Ray worker's directory)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if artifact_root is not None and _is_local_store(client.tracking_uri):
        location = (artifact_root / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` for MLflow params."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    text = str(value)
    return {prefix: text if len(text) <= _MAX_PARAM else text[: _MAX_PARAM - 3] + "..."}


def find_run(client: MlflowClient, experiment_id: str, **tags: str):
    """Newest run whose tags equal ``tags`` (None if none)."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def start_or_resume(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    tags: dict[str, str],
    parent_id: Optional[str] = None,
    resume: bool = True,
):
    """The run to write to: the newest unfinished-or-resumable match, else a new one."""
    match = {**tags, MLFLOW_RUN_NAME: name}
    if parent_id:
        match[MLFLOW_PARENT_RUN_ID] = parent_id
    run = find_run(client, experiment_id, **match) if resume else None
    if run is not None:
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return client.get_run(run.info.run_id)
    all_tags = dict(tags)
    if parent_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_id
    return client.create_run(experiment_id, run_name=name, tags=all_tags)


class RunLogger:
    """Batched logging into one run by id (used by rank 0 of a Ray Train stage).

    ``skip_through`` drops metrics at steps already logged by an earlier attempt, so a
    run resumed from a checkpoint continues its curves with no step logged twice.
    """

    def __init__(self, tracking_uri: str, run_id: str, skip_through: int = -1):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.skip_through = skip_through

    @classmethod
    def resume(cls, tracking_uri: str, run_id: str, step_metric: str) -> "RunLogger":
        client = MlflowClient(tracking_uri)
        history = client.get_metric_history(run_id, step_metric)
        return cls(tracking_uri, run_id, max((m.step for m in history), default=-1))

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        if step <= self.skip_through:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None and math.isfinite(float(v))]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def params(self, values: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in values.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def tags(self, values: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def artifact(self, path: os.PathLike | str, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def artifacts(self, paths: Iterable[os.PathLike | str], artifact_path: Optional[str] = None) -> None:
        for path in paths:
            self.artifact(path, artifact_path)
