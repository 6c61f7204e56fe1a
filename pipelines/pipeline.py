"""One pipeline run: pretraining, then the transfer stages, under one MLflow parent run.

Each stage gets a nested run and the previous pretraining stage's encoder checkpoint.
Running the same config again (same ``name``) or with ``resume=<parent run id>``
continues that pipeline: finished stages are skipped, an unfinished one resumes from its
last checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import ray
import yaml
from mlflow.tracking import MlflowClient
from rich.table import Table

from pipelines import storage
from pipelines.config import PipelineConfig, absolute
from pipelines.data.quality import start_skip_counter
from pipelines.data.ray_internals import in_ray_job
from pipelines.console import RunConsole
from pipelines.stages.driver import StageOutcome, run_worker_group
from pipelines.spool import pending_spools
from pipelines.stages.jobs import HEADLINE, Preempted, StageError, TrackingAway
from pipelines.stages.prepare import StageContext
from pipelines.tracking import (
    KIND, MODEL_URI, RunLogger, ensure_experiment, flatten, fluent_tracking_uri, missing_local_store, open_spool,
    resolve_tracking_uri, spool_address, start_or_resume,
)

#: a server that is up takes an earlier run's records in seconds
SPOOLED_AT_START_WAIT_S = 30.0


@dataclass
class PipelineOutcome:
    run_id: str
    experiment_id: str
    tracking_uri: str
    stages: list[StageOutcome] = field(default_factory=list)


def init_ray(config: PipelineConfig) -> None:
    """Join the cluster the config or ``RAY_ADDRESS`` names, else start a private local one;
    either way, the run's Ray processes reach the object store this one names."""
    if ray.is_initialized():
        return
    # Read by Ray Data in every process; a local cluster's workers inherit it from here.
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    cluster = config.ray.cluster()
    if not cluster:
        # One machine is never preempted; the watcher is one more actor per stage.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Train's controller notices a finished or failed worker group at its next poll
        # (every 2 s by default); polling a few local workers more often costs nothing.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    kwargs = {"num_cpus": config.ray.num_cpus} if (config.ray.num_cpus and not cluster) else {}
    unreachable = StageError(
        f"no Ray cluster answers at {cluster} ({'ray.address in the config' if config.ray.address else 'RAY_ADDRESS'}): "
        "start it (`ray start --head`), or leave both unset to run on a private local cluster"
    )
    if cluster and not _answers(cluster):
        raise unreachable  # ray.init would retry a dead address for minutes
    # A local cluster started here inherits this process's environment, and a Ray job's processes
    # get the job's: a cluster joined otherwise is told where the object store is (its nodes hold
    # their own credentials).
    env = storage.runtime_env() if cluster and not in_ray_job() else None
    try:
        ray.init(
            address=cluster or "local", configure_logging=True, logging_level="WARNING",
            logging_config=ray.LoggingConfig(log_level="WARNING"), runtime_env=env, **kwargs,
        )
    except ConnectionError:
        raise unreachable from None


@contextmanager
def stop_on_sigterm(stop_file: str, console: Optional[RunConsole]) -> Iterator[None]:
    """SIGTERM (a scheduler preempting the job, ``kill``) makes the running stages save a
    checkpoint at their next step and stop: the driver writes ``stop_file`` in the storage
    (an object in a bucket), which every worker looks for. The run then ends with
    :class:`Preempted`. A second SIGTERM ends the driver at once. Only a main thread can take
    signals (a sweep's trials cannot; Tune stops those)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # installed from outside Python
        previous = signal.SIG_DFL

    def ask_to_stop(signum, frame) -> None:
        if storage.exists(stop_file):
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)
            return
        storage.write_text(stop_file, "")
        message = ("SIGTERM: each running stage saves a checkpoint at its next step and stops "
                   "(a second SIGTERM stops at once)")
        console.event(message, "yellow") if console is not None else print(message, flush=True)

    signal.signal(signal.SIGTERM, ask_to_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def deliver_spooled(location: str, wait_s: float, say=print) -> list[Path]:
    """Deliver what earlier stages spooled on this machine for storage ``location`` and could
    not send; the spool folders still not delivered after ``wait_s`` seconds each. A folder
    whose local tracking store is gone is named and left as it is: nothing can take its records."""
    left = []
    for directory in pending_spools(storage.local_root(location)):
        gone = missing_local_store(spool_address(directory)["tracking_uri"])
        if gone is not None:
            say(f"the tracking store of MLflow run {directory.name}, {gone}, no longer exists: its records stay "
                f"in {directory} (delete the folder once they are not wanted)")
            continue
        spool = open_spool(directory, say)
        count = spool.pending()
        if spool.drain(wait_s):
            say(f"delivered {count} spooled record(s) of MLflow run {directory.name}")
        else:
            left.append(directory)
    return left


def usable_storage(location: str) -> str:
    """``location`` made absolute, once an object store there has taken a write and given it
    back (:func:`pipelines.storage.probe`)."""
    root = storage.absolute(location)
    try:
        storage.probe(root)
    except storage.StorageError as exc:
        raise StageError(str(exc)) from None
    return root


def ready_storage(config: PipelineConfig, console: Optional[RunConsole] = None) -> str:
    """The run's storage, made absolute and checked before any Ray process depends on it (a
    bucket that cannot be used is one message), with what earlier runs spooled on this machine
    delivered first."""
    root = usable_storage(config.storage)
    if pending_spools(storage.local_root(root)):
        left = deliver_spooled(root, SPOOLED_AT_START_WAIT_S, say=console.event if console else print)
        if left:
            raise TrackingAway(f"records of an earlier run wait in {', '.join(map(str, left))} and the tracking "
                               f"server does not take them; start it, then run again (or `mixmae sync`)")
    return root


def _answers(address: str, timeout_s: float = 5.0) -> bool:
    """Whether something listens at a ``[ray://]host:port`` address (True for other forms,
    such as ``auto``, which Ray resolves itself)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return True
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def synthetic_roots(config: PipelineConfig) -> dict[str, Path]:
    if config.synthetic is None:
        return {}
    from pipelines.data.synth import write_synthetic

    syn = config.synthetic
    return {k: Path(v) for k, v in write_synthetic(absolute(syn.root), syn.scale, syn.seed).items()}


def run_pipeline(
    config: PipelineConfig,
    stages: Optional[Sequence[str]] = None,
    resume: Optional[str] = None,
    console: Optional[RunConsole] = None,
    parent_run_id: Optional[str] = None,
    callbacks: Optional[dict[str, list]] = None,
    beside: Sequence[float] = (),
) -> PipelineOutcome:
    """Run the selected stages (default: all). ``console`` shows a person the run (events,
    progress); ``parent_run_id`` nests the pipeline run under another one (a sweep);
    ``callbacks`` adds Ray Train callbacks per stage; ``beside``: the CPUs of each worker group
    of other runs sharing the cluster meanwhile (a sweep's other trials)."""
    known = list(config.all_stages())
    selected = list(stages) if stages else known
    if "pretrain" in selected and "tokenizer" in known and "tokenizer" not in selected:
        selected.insert(0, "tokenizer")  # BEiT's pretraining needs its tokenizer
    unknown = sorted(set(selected) - set(known))
    if unknown:
        raise StageError(f"unknown stage(s) {unknown}; this config has {known}")
    root = ready_storage(config, console)
    init_ray(config)
    # the stages' workers inherit this process's DataContext (a sweep's trial process too)
    ray.data.DataContext.get_current().enable_progress_bars = False
    uri = resolve_tracking_uri(config.tracking.uri)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, config.tracking.experiment, Path.cwd() / "mlartifacts")
    parent_id = _pipeline_run(config, client, experiment_id, resume, parent_run_id)
    logger = RunLogger(uri, parent_id)
    if console is not None:
        console.event(f"pipeline {config.name}: MLflow run {parent_id} in {uri} (experiment {config.tracking.experiment})")
    counter_name = f"skips-{parent_id}-{uuid.uuid4().hex[:8]}"  # one per attempt: an old one may still be dying
    ctx = StageContext(
        config=config,
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent_id,
        storage=root,
        synthetic_roots=synthetic_roots(config),
        console=console,
        callbacks=callbacks or {},
        skip_counter_name=counter_name,
        keepalive=[start_skip_counter(counter_name)],  # the actor lives as long as this handle
        beside=tuple(beside),
    )
    ctx.stop_file = storage.join(root, "control", f"{parent_id}.stop")
    storage.delete(ctx.stop_file)  # left by a run that was stopped: this one continues it
    outcome = PipelineOutcome(parent_id, experiment_id, uri)
    stage_specs = config.all_stages()
    if console is not None:
        console.start_progress()
    try:
        with stop_on_sigterm(ctx.stop_file, console):
            _run_stages(ctx, selected, outcome)
    except Preempted:
        client.set_terminated(parent_id, "KILLED")
        raise
    except TrackingAway:
        raise  # the server is away: the run's status is set when its records are delivered
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    finally:
        if console is not None:
            console.stop_progress()
    summary = summary_metrics(config, outcome.stages)
    logger.metrics(summary, 0)
    if config.tracking.registered_model and "pretrain" in selected:
        register_encoder(uri, config.tracking.registered_model, client.get_run(outcome.stages[0].run_id), summary, parent_id)
    client.set_terminated(parent_id, "FINISHED" if set(selected) == set(stage_specs) else "RUNNING")
    return outcome


def _pipeline_run(
    config: PipelineConfig, client: MlflowClient, experiment_id: str, resume: Optional[str], parent_run_id: Optional[str]
) -> str:
    """The pipeline's MLflow run (the one to ``resume``, or the config's by name), with the
    config as params and artifact and the pretraining's method and encoder as tags."""
    if resume:
        parent = client.get_run(resume)
        if parent.data.tags.get(KIND) != "pipeline":
            raise StageError(f"run {resume} is not a mixmae pipeline run")
    else:
        parent = start_or_resume(client, experiment_id, config.name, {KIND: "pipeline"}, parent_id=parent_run_id)
    check_same_pretraining(config, parent)
    logger = RunLogger(client.tracking_uri, parent.info.run_id)
    logger.tags({"method": config.pretrain.method, "encoder": config.pretrain.model})
    logger.params(flatten("", config.model_dump(mode="json")))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline_config.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        logger.artifact(path)
    return parent.info.run_id


def _run_stages(ctx: StageContext, selected: list[str], outcome: PipelineOutcome) -> None:
    """BEiT's tokenizer, then pretraining (with the transfer stages grouped with it), each
    handing its weights on; then the other transfer stages' worker groups, side by side."""
    config = ctx.config
    groups = config.worker_groups(selected)
    if "tokenizer" in selected:
        (tokenizer,) = run_worker_group(ctx, "tokenizer", ["tokenizer"])
        outcome.stages.append(tokenizer)
        ctx.tokenizer_checkpoint = tokenizer.encoder_checkpoint
        ctx.tokenizer_flops = tokenizer.metrics.get("flops/train_total", 0.0)
    if "pretrain" in selected:
        group, names = groups.pop(0)
        results = run_worker_group(ctx, group, names)
        outcome.stages += results
        ctx.encoder_checkpoint = results[0].encoder_checkpoint
    elif groups:
        ctx.encoder_checkpoint = _finished_encoder(ctx.client(), ctx.experiment_id, ctx.parent_run_id)
    outcome.stages += _run_concurrently(ctx, groups, config.max_parallel_stages)


def register_encoder(uri: str, name: str, pretrain_run, summary: dict[str, float], pipeline_run_id: str) -> None:
    """A new version of registered model ``name``: the pretrained encoder's MLflow model, its
    pipeline's FLOPs and accuracies as version tags (a rerun that pretrained nothing new adds none)."""
    import mlflow

    model_uri = pretrain_run.data.tags.get(MODEL_URI)
    client = MlflowClient(uri)
    known = client.search_model_versions(f"name = '{name}'") if client.search_registered_models(f"name = '{name}'") else []
    if not model_uri or any(v.tags.get("pipeline_run") == pipeline_run_id for v in known):
        return
    tags = {"pipeline_run": pipeline_run_id, **{k: f"{v:.6g}" for k, v in summary.items()}}
    with fluent_tracking_uri(uri):
        mlflow.register_model(model_uri, name, tags=tags)


SUMMARY_KEYS = (
    "flops/train_total", "flops/encoder_gmacs", "flops/task_gmacs", "time/wall_s", "time/device_hours", "data/val_images",
    "eval/knn_top1", "eval/knn_images",
)


def summary_metrics(config: PipelineConfig, outcomes: Sequence[StageOutcome]) -> dict[str, float]:
    """Per stage, its headline metric and costs on the pipeline run (``inat2018.val_top1``,
    ``pretrain.flops_train_total``...), so runs compare in the MLflow UI and in reports."""
    stages = config.all_stages()
    out: dict[str, float] = {}
    for result in outcomes:
        headline = HEADLINE[stages[result.name].task]
        keys = {headline, f"{headline}_best", *SUMMARY_KEYS}
        if stages[result.name].task == "detect":
            keys.add("val/segm_AP")
        for key in keys & set(result.metrics):
            out[f"{result.name}.{key.replace('/', '_')}"] = result.metrics[key]
    return out


def check_same_pretraining(config: PipelineConfig, parent) -> None:
    """Refuse to continue a pipeline run with another pretraining method or encoder: its
    checkpoints hold the other model, which would not load (or would load into the wrong one)."""
    logged = parent.data.params
    for setting in ("method", "model"):
        was, now = logged.get(f"pretrain.{setting}"), str(getattr(config.pretrain, setting))
        if was is not None and was != now:
            raise StageError(
                f"pipeline {config.name} (MLflow run {parent.info.run_id}) was started with pretrain.{setting} {was}; "
                f"its checkpoints cannot continue as {now}. Give this config another name, or set {setting} back"
            )


def _run_concurrently(ctx: StageContext, groups: list[tuple[str, list[str]]], parallel: int) -> list[StageOutcome]:
    """Transfer stages depend only on pretraining: run up to ``parallel`` worker groups at
    once. A failed group does not stop the others; the failures are raised together at the
    end. Outcomes come back in config order."""
    results: dict[str, StageOutcome] = {}
    failures: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="stage") as pool:
        futures = [pool.submit(run_worker_group, ctx, group, names, beside)
                   for (group, names), beside in zip(groups, groups_beside(ctx.config, groups, parallel))]
        for future in as_completed(futures):
            try:
                results.update((result.name, result) for result in future.result())
            except Exception as exc:
                failures.append(exc)
    if failures:
        # the most telling kind: a failure, else the server away, else a stop that was asked for
        kinds = {type(exc) for exc in failures}
        kind = Preempted if kinds == {Preempted} else TrackingAway if kinds <= {TrackingAway, Preempted} else StageError
        raise kind("; ".join(f"{exc}" for exc in failures))
    return [results[name] for name in ctx.config.stages if name in results]


def group_cpus(config: PipelineConfig, names: Sequence[str]) -> float:
    """The CPUs a worker group's workers take (its stages share one scaling)."""
    return config.all_stages()[names[0]].scaling.cpus


def groups_beside(config: PipelineConfig, groups: list[tuple[str, list[str]]], parallel: int) -> list[list[float]]:
    """For each worker group, the CPUs of those that may run beside it when ``parallel`` run at
    once: the largest ``parallel - 1`` of the others (whichever run together, none takes more)."""
    cpus = [group_cpus(config, names) for _, names in groups]
    return [sorted(cpus[:i] + cpus[i + 1:], reverse=True)[: max(0, parallel - 1)] for i in range(len(groups))]


def _finished_encoder(client: MlflowClient, experiment_id: str, parent_id: str) -> Optional[str]:
    """The encoder of this pipeline's finished pretraining stage, if it has one."""
    from pipelines.tracking import COMPLETE, ENCODER, STAGE, find_run
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run = find_run(client, experiment_id, **{STAGE: "pretrain", MLFLOW_PARENT_RUN_ID: parent_id, COMPLETE: "true"})
    return run.data.tags.get(ENCODER) if run else None


def summary_table(config: PipelineConfig, outcome: PipelineOutcome) -> Table:
    """One row per stage: its headline metric at the end of training ("final") and the best
    of its evaluations ("best", as the official scripts report), its FLOPs and wall time."""
    table = Table(title=f"pipeline {config.name} (MLflow run {outcome.run_id})")
    for column in ("stage", "metric", "final", "best", "GFLOPs", "train FLOPs", "wall s", "note"):
        table.add_column(column, justify="right" if column not in ("stage", "metric", "note") else "left")
    stages = config.all_stages()
    for result in outcome.stages:
        key = HEADLINE[stages[result.name].task]
        m = result.metrics
        best = m.get(f"{key}_best")
        table.add_row(
            result.name,
            key,
            f"{m.get(key, float('nan')):.4f}",
            "" if best is None else f"{best:.4f}",
            f"{m.get('flops/encoder_gmacs', m.get('flops/task_gmacs', float('nan'))):.2f}",
            f"{m.get('flops/train_total', 0):.2e}",
            f"{m.get('time/wall_s', float('nan')):.0f}",
            "skipped (finished earlier)" if result.skipped else "",
        )
    return table
