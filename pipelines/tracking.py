"""MLflow: tracking URI resolution, pipeline/stage runs, rank-0 logging from Ray workers.

Layout of an experiment: one parent run per pipeline (tag ``mixmae.kind=pipeline``), one
nested run per stage (``mixmae.stage=<name>``). Runs are found again by name, so the
same command with the same run name resumes instead of starting over.

Workers never use MLflow's global state (its active run is per process and Ray workers
chdir); they talk to the run by id through an ``MlflowClient``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipelines import storage
from pipelines.spool import RUN_FILE, Spool, spool_root

KIND = "mixmae.kind"
STAGE = "mixmae.stage"
COMPLETE = "mixmae.complete"
FAILED_REASON = "mixmae.failure"
ENCODER = "mixmae.encoder_checkpoint"
CHECKPOINT = "mixmae.checkpoint"
MODEL_URI = "mixmae.model_uri"
#: The experiment tag MLflow 3's UI reads to choose an experiment's first page, and its value
#: for custom model training (the others are GenAI kinds).
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
_MAX_PARAM = 6000

# The project's calls to a tracking server retry twice, seconds apart, not for MLflow's default
# four minutes: what must not be lost goes through a spool that retries for as long as it
# takes, and a driver call that cannot wait fails with a message. Set them to override.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


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
    absolute (MLflow's default, ./mlruns, would follow each Ray worker's directory). The
    experiment is marked as model training, so MLflow's UI opens it on its runs rather than
    on its GenAI overview."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND) is None:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return found.experiment_id
    location = None
    if artifact_root is not None and _is_local_store(client.tracking_uri):
        location = (artifact_root / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_TRAINING})


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
    """Batched logging into one run by id.

    With a ``spool`` (Ray Train workers) metrics, tags and artifacts are appended to it and
    delivered by its sender, so training never waits on the tracking server; without one
    (the driver) they go straight to the server. ``skip_through`` drops metrics at steps
    already logged by an earlier attempt, so a run resumed from a checkpoint continues its
    curves with no step logged twice.
    """

    def __init__(self, tracking_uri: str, run_id: str, skip_through: int = -1, spool: Optional[Spool] = None):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.skip_through = skip_through
        self.spool = spool

    def _send(self, record: dict[str, Any]) -> None:
        if self.spool is not None:
            self.spool.append(record)
        else:
            send_record(self.client, self.run_id, record)

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        if step <= self.skip_through:
            return
        now = int(time.time() * 1000)
        rows = [[k, float(v), now, step] for k, v in values.items() if v is not None and math.isfinite(float(v))]
        if rows:
            self._send({"kind": "metrics", "metrics": rows})

    def params(self, values: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in values.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def tags(self, values: Mapping[str, Any]) -> None:
        self._send({"kind": "tags", "tags": {k: str(v) for k, v in values.items()}})

    def artifact(self, path: os.PathLike | str, artifact_path: Optional[str] = None, lasting: bool = False) -> None:
        """``lasting``: the file stays where it is until delivered (a persisted checkpoint);
        otherwise a spool keeps a copy."""
        source = str(path) if (self.spool is None or lasting) else self.spool.keep(Path(path))
        self._send({"kind": "artifact", "path": source, "artifact_path": artifact_path})

    def artifacts(self, paths: Iterable[os.PathLike | str], artifact_path: Optional[str] = None,
                  lasting: bool = False) -> None:
        for path in paths:
            self.artifact(path, artifact_path, lasting)

    def model(self, config: dict[str, Any], weights: os.PathLike | str) -> None:
        """The stage's MLflow model (see :func:`log_stage_model`), its URI as tag ``mixmae.model_uri``."""
        self._send({"kind": "model", "config": config, "weights": str(weights)})

    def inputs(self, datasets: list[dict[str, Any]]) -> None:
        """Dataset inputs, each given as :func:`dataset_input`'s keyword arguments."""
        self._send({"kind": "inputs", "datasets": datasets})


def send_record(client: MlflowClient, run_id: str, record: dict[str, Any]) -> None:
    """Deliver one record of :class:`RunLogger` to run ``run_id`` (raising if the server does
    not take it)."""
    kind = record["kind"]
    if kind == "metrics":
        batch = [Metric(key, value, timestamp, step) for key, value, timestamp, step in record["metrics"]]
        for i in range(0, len(batch), 500):
            client.log_batch(run_id, metrics=batch[i : i + 500])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif kind == "artifact":  # a checkpoint's file may be in a bucket: MLflow logs a local file
        with storage.fetched(record["path"]) as path:
            client.log_artifact(run_id, str(path), record["artifact_path"])
    elif kind == "model":
        with storage.fetched(record["weights"]) as weights:
            uri = log_stage_model(client.tracking_uri, run_id, record["config"], weights)
        client.set_tag(run_id, MODEL_URI, uri)
    elif kind == "inputs":
        client.log_inputs(run_id, datasets=[dataset_input(**d) for d in record["datasets"]])
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")


def run_spool(root: Path, tracking_uri: str, run_id: str, part: str = "",
              say: Callable[[str], None] = print) -> Spool:
    """The spool of run ``run_id`` under ``root`` (the storage's folder on this node, see
    :func:`pipelines.storage.local_root`; ``part`` names another writer of the same run, e.g. the
    system metrics of a second node): it remembers its server and run, so ``mixmae sync`` can
    deliver it with nothing else known."""
    directory = spool_root(root) / (f"{run_id}.{part}" if part else run_id)
    address = directory / RUN_FILE
    if not address.exists():
        directory.mkdir(parents=True, exist_ok=True)
        address.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))
    return open_spool(directory, say)


def run_spools(root: Path, run_id: str) -> list[Path]:
    """Every spool folder of run ``run_id`` under ``root`` (its main one and those of other writers)."""
    return sorted(d for d in spool_root(root).glob(f"{run_id}*") if d.name == run_id or d.name.startswith(f"{run_id}."))


def spool_address(directory: Path) -> dict[str, str]:
    """The run and tracking server a spool folder delivers to: ``{"run_id", "tracking_uri"}``."""
    return json.loads((Path(directory) / RUN_FILE).read_text())


def missing_local_store(uri: str) -> Optional[Path]:
    """The file or folder of a local tracking store (SQLite, or a file store) that is no longer
    there; None for a server, or a store that is. A client opened on it would make a new, empty
    store in its place, and every record sent there would be refused (its run is not in it)."""
    if not _is_local_store(uri):
        return None
    path = Path(uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else urllib.parse.urlparse(uri).path)
    return None if path.exists() else path


def open_spool(directory: Path, say: Callable[[str], None] = print) -> Spool:
    """An existing spool folder, delivering to the run and server it names."""
    address = spool_address(directory)
    client = MlflowClient(address["tracking_uri"])
    return Spool(directory, lambda record: send_record(client, address["run_id"], record), say, server_away)


def server_away(exc: Exception) -> bool:
    """Whether a tracking call that failed may succeed later: the server unreachable, slow,
    overloaded or failing (5xx, 429), rather than refusing what it was sent."""
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500 or exc.get_http_status_code() == 429
    return isinstance(exc, OSError)  # connection errors, timeouts (requests' are OSErrors too)


def dataset_input(name: str, source: str, digest: str, context: str, profile: dict[str, Any]) -> DatasetInput:
    """A dataset a run read, as MLflow's Dataset column and run page show it."""
    source_type = "local" if "://" not in source else source.split("://", 1)[0]
    dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps({"uri": source}),
                      profile=json.dumps(profile))
    return DatasetInput(dataset=dataset, tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)])


def spooled_steps(spool: Spool, metric: str) -> list[int]:
    """The steps at which ``metric`` went into ``spool``, in order."""
    return [row[3] for record in spool.all_records() if record["kind"] == "metrics"
            for row in record["metrics"] if row[0] == metric]


def spooled_step(spool: Spool, metric: str) -> int:
    """The last step at which ``metric`` went into ``spool`` (-1: none)."""
    return max(spooled_steps(spool, metric), default=-1)


def delivered_step(tracking_uri: str, run_id: str, metric: str) -> int:
    """The last step of ``metric`` the tracking server has (-1: none, or the server is away)."""
    try:
        return max((m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, metric)), default=-1)
    except Exception:  # away: the spool's own record is all there is
        return -1


class SystemSampler:
    """CPU, memory, disk and network of this node (and its GPUs, where it has them), read by
    MLflow's own monitors every ``interval`` seconds and handed to ``emit(metrics, step)`` as
    ``system/[<node>/]<name>``.

    Not MLflow's ``SystemMetricsMonitor``: that one ends for good at the first tracking call
    that fails, and logs nothing for a block shorter than its interval. This one keeps
    sampling whatever ``emit`` does, and takes a last sample when it is closed.
    """

    def __init__(self, emit: Callable[[dict[str, float], int], None], node: Optional[str] = None,
                 interval: float = 10.0, first_step: int = 0):
        from mlflow.system_metrics.system_metrics_monitor import (
            CPUMonitor, DiskMonitor, GPUMonitor, NetworkMonitor,
        )

        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            self.monitors.append(GPUMonitor())
        except Exception:  # no NVIDIA GPU or no pynvml: the other monitors still say what matters
            pass
        self.emit, self.interval, self.step = emit, interval, first_step
        self.prefix = f"system/{node}/" if node else "system/"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mixmae-system-metrics", daemon=True)

    def start(self) -> "SystemSampler":
        self._thread.start()
        return self

    def sample(self) -> None:
        values: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            values.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        self.emit({self.prefix + key: value for key, value in values.items()}, self.step)
        self.step += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@contextmanager
def system_metrics(emit: Callable[[dict[str, float], int], None], node: Optional[str] = None,
                   interval: float = 10.0, first_step: int = 0) -> Iterator[None]:
    """:class:`SystemSampler` while the block runs."""
    sampler = SystemSampler(emit, node, interval, first_step).start()
    try:
        yield
    finally:
        sampler.close()


def log_stage_model(tracking_uri: str, run_id: str, config: dict[str, Any], weights: Path) -> str:
    """Log a stage's model (``config`` from ``stage_model.job_config``) as an MLflow model of its
    run: a pyfunc rebuilt from ``weights`` (see ``pipelines/stage_model.py``), with a signature
    and input example; its URI. A run's model of that name already logged is not logged again."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import infer_signature

    from pipelines import stage_model

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{config['name']}'"
    )
    ready = [model for model in logged if model.status == LoggedModelStatus.READY]
    if ready:
        return ready[0].model_uri
    model = stage_model.load(config, str(weights))  # what a loader will do, checked here
    size = config["spec"]["img_size"]
    example = np.zeros((1, 3, size, size), np.float32)
    output = stage_model.outputs(config["task"], model, torch.from_numpy(example))
    logged = client.create_logged_model(experiment_id, name=config["name"], source_run_id=run_id)
    with fluent_tracking_uri(tracking_uri):
        info = mlflow.pyfunc.log_model(
            python_model=stage_model.__file__, model_id=logged.model_id, artifacts={"weights": str(weights)},
            model_config=config, input_example=example, signature=infer_signature(example, output),
            pip_requirements=[f"mixmae-pipeline=={_version()}"],
        )
    return info.model_uri


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (model logging, registration) on ``uri`` while the block runs.
    ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in this process's environment,
    which wins over a config's URI: left set, every later pipeline of the process (a notebook,
    a sweep's trial, a test) would log to this store instead of its own."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the variable


def _version() -> str:
    from importlib.metadata import version

    return version("mixmae-pipeline")
