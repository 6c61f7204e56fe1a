"""Running a sweep (``mixmae sweep``): its Tune trials, each a pipeline run, and what a
person sees of them; the sweep's settings and names are :mod:`pipelines.sweep`'s."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import Callback

from pipelines import storage
from pipelines.config import PipelineConfig
from pipelines.console import PROGRESS_EVERY_S, RunConsole
from pipelines.pipeline import group_cpus, init_ray, run_pipeline, usable_storage
from pipelines.sweep import (
    FLOPS_METRIC, KNN_METRIC, PROBE_METRIC, Cases, Choice, Grid, Space, SweepConfig, setting_name, trial_config,
    trial_error, trial_label, trial_name,
)
from pipelines.tracking import KIND, RunLogger, ensure_experiment, resolve_tracking_uri, start_or_resume


def _space(spec: Space):
    from ray import tune

    if isinstance(spec, Grid):
        return tune.grid_search(spec.grid)
    if isinstance(spec, Choice):
        return tune.choice(spec.choice)
    if isinstance(spec, Cases):
        return tune.grid_search(spec.cases)
    return tune.uniform(*spec.uniform)


def _trial(config: dict) -> None:
    """One Tune trial: run the trial's pipeline, then report its FLOPs and probe accuracy."""
    from ray import tune

    from ray.tune.integration.ray_train import TuneReportCallback

    sweep = SweepConfig.model_validate(config["sweep"])
    base = PipelineConfig.model_validate(config["base"])
    params = {key: config[key] for key in sweep.search}
    trial = trial_config(base, sweep, params, config["seed"])
    # the pretraining's evaluations reach Tune as they happen: the console shows them, ASHA decides on them
    # the trials running beside this one each hold a driver and a pretraining worker group
    beside = [sweep.trial_cpus + group_cpus(trial, ["pretrain"])] * (sweep.max_concurrent_trials - 1)
    outcome = run_pipeline(trial, parent_run_id=config["sweep_run_id"], callbacks={"pretrain": [TuneReportCallback()]},
                           beside=beside)
    stages = {stage.name: stage for stage in outcome.stages}  # BEiT's tokenizer stage comes first
    pretrain, probe = stages["pretrain"], stages["probe"]
    metrics = {
        FLOPS_METRIC: pretrain.metrics.get("flops/train_total", float("nan")),
        KNN_METRIC: pretrain.metrics.get("eval/knn_top1", float("nan")),
        PROBE_METRIC: probe.metrics.get("val/top1", float("nan")),
    }
    logger = RunLogger(outcome.tracking_uri, outcome.run_id)
    logger.params({**sweep.pretrain_fields(params), "seed": config["seed"], "method": trial.pretrain.method,
                   "encoder": trial.pretrain.model, "sweep": sweep.name, "trial": setting_name(sweep, params)})
    logger.metrics(metrics, 0)
    tune.report({**metrics, "mlflow_run_id": outcome.run_id})


def run_sweep(sweep: SweepConfig, base: PipelineConfig, resume: bool = True, console: Optional[RunConsole] = None):
    """Run (or resume) the sweep, telling ``console`` what its trials do; returns the sweep's
    MLflow run id and Tune's ResultGrid."""
    from ray.tune.schedulers import ASHAScheduler

    uri = resolve_tracking_uri(base.tracking.uri)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, base.tracking.experiment, Path.cwd() / "mlartifacts")
    sweep_run = start_or_resume(client, experiment_id, sweep.name, {KIND: "sweep"})
    RunLogger(uri, sweep_run.info.run_id).params(
        {"seeds": json.dumps(sweep.seeds), **{f"search.{k}": json.dumps(v.model_dump()) for k, v in sweep.search.items()}}
    )
    root = usable_storage(sweep.storage)
    init_ray(base)
    # trials run in their own directories: every path and the store must be absolute
    base = base.resolved()
    base = base.model_copy(update={"tracking": base.tracking.model_copy(update={"uri": uri})})
    param_space = {
        **{key: _space(spec) for key, spec in sweep.search.items()},
        "seed": tune.grid_search(sweep.seeds),
        "sweep": sweep.model_dump(mode="json"),
        "base": base.model_dump(mode="json"),
        "sweep_run_id": sweep_run.info.run_id,
    }
    trainable = tune.with_resources(_trial, {"CPU": sweep.trial_cpus})
    state = storage.train_storage(storage.join(root, sweep.name))
    # a trial's checkpoint reports carry its training metrics, its evaluations the monitor's
    # accuracy: the scheduler decides on the reports that hold its metric, and passes the rest
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    SweepEvents.console = console
    if resume and tune.Tuner.can_restore(state["storage_path"], state.get("storage_filesystem")):
        tuner = tune.Tuner.restore(state["storage_path"], trainable=trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=state.get("storage_filesystem"))
    else:
        scheduler = None
        if sweep.scheduler is not None:
            metric, mode, time_attr = sweep.scheduler.target()
            scheduler = ASHAScheduler(
                metric=metric, mode=mode, time_attr=time_attr, grace_period=sweep.scheduler.grace_period,
                reduction_factor=sweep.scheduler.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent_trials, scheduler=scheduler,
                trial_name_creator=_tune_trial_name, trial_dirname_creator=_tune_trial_name,
            ),
            run_config=tune.RunConfig(name=sweep.name, **storage.train_storage(root), verbose=0, callbacks=[SweepEvents()]),
        )
    grid = tuner.fit()
    _mark_stopped(client, experiment_id, sweep_run.info.run_id, [r for r in grid if not r.error and PROBE_METRIC not in r.metrics])
    failed = sum(1 for result in grid if result.error)
    RunLogger(uri, sweep_run.info.run_id).tags({"mixmae.failed_trials": failed})
    client.set_terminated(sweep_run.info.run_id, "FAILED" if failed else "FINISHED")
    return sweep_run.info.run_id, grid


def _mark_stopped(client: MlflowClient, experiment_id: str, sweep_run_id: str, stopped: list) -> None:
    """The MLflow runs of trials the scheduler stopped (their processes were ended mid-stage): KILLED, and said why."""
    for result in stopped:
        name = trial_name(SweepConfig.model_validate(result.config["sweep"]),
                          {k: result.config[k] for k in result.config["sweep"]["search"]}, result.config["seed"])
        for pipeline in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_run_id}' and "
                                                            f"attributes.run_name = '{name}' and attributes.status = 'RUNNING'"):
            stages = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{pipeline.info.run_id}' and "
                                                         "attributes.status = 'RUNNING'")
            for run in [pipeline, *stages]:
                client.set_tag(run.info.run_id, "mixmae.stopped_by", "ASHA")
                client.set_terminated(run.info.run_id, "KILLED")


def _tune_trial_name(trial) -> str:
    return trial_label(trial.config)


class SweepEvents(Callback):
    """The sweep's console (see :class:`~pipelines.console.RunConsole`): a line per trial event
    (started with its settings, its pretraining's evaluations, finished with FLOPs and
    accuracy, failed with its reason), a bar per trial on a terminal and a count of the trials
    every ``PROGRESS_EVERY_S`` seconds off one. Tune saves its callbacks with the sweep, so the
    console, which holds open files, is the class's and not saved."""

    console: Optional[RunConsole] = None

    def __init__(self) -> None:
        self.bars: dict[str, int] = {}
        self.last_line = 0.0

    def _say(self, trial, message: str, style: str = "") -> None:
        if self.console is not None:
            self.console.event(f"{trial_label(trial.config)}: {message}", style)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        sweep = SweepConfig.model_validate(trial.config["sweep"])
        settings = {**sweep.pretrain_fields({k: trial.config[k] for k in sweep.search}), "seed": trial.config["seed"]}
        self._say(trial, "started, " + ", ".join(f"{k} {v}" for k, v in settings.items()))
        if self.console is not None and self.console.progress is not None:
            self.bars[trial.trial_id] = self.console.progress.add_task(trial_label(trial.config), total=None, info="starting")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "eval/knn_top1" not in result:
            return
        line = (f"pretraining step {result['step']}, k-NN top-1 {result['eval/knn_top1']:.3f} "
                f"after {result.get('flops/train_total', float('nan')):.2e} FLOPs")
        bar = self.bars.get(trial.trial_id)
        if bar is None:
            self._say(trial, line)
        else:
            self.console.progress.update(bar, info=line)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        m = trial.last_result
        if PROBE_METRIC not in m:  # stopped by ASHA: Tune completes it without the trial's final report
            self._say(trial, f"stopped by ASHA at pretraining step {m.get('step', '?')} "
                             f"(k-NN top-1 {m.get('eval/knn_top1', float('nan')):.3f})", "yellow")
            return
        self._say(trial, f"finished: pretraining {m[FLOPS_METRIC]:.3e} FLOPs, k-NN top-1 {m[KNN_METRIC]:.4f}, "
                         f"probe top-1 {m[PROBE_METRIC]:.4f} (MLflow run {m['mlflow_run_id']})", "green")
        self._done(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        local = Path(trial.error_file) if trial.error_file else None  # what get_error reads once synced to storage
        error = local.read_text() if local is not None and local.exists() else trial.get_error()
        self._say(trial, f"failed: {trial_error(error or 'no error recorded')}", "red")
        self._done(trial, "failed")

    def _done(self, trial, info: str) -> None:
        bar = self.bars.pop(trial.trial_id, None)
        if bar is not None:
            self.console.progress.update(bar, info=info)

    def on_step(self, iteration, trials, **info) -> None:
        if self.console is None or self.console.progress is not None or time.monotonic() - self.last_line < PROGRESS_EVERY_S:
            return
        self.last_line = time.monotonic()
        states = Counter(trial.status for trial in trials)
        self.console.event("sweep: " + ", ".join(f"{n} {state.lower()}" for state, n in sorted(states.items())))


