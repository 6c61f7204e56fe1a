"""Ray Tune sweeps over pretraining settings (method and encoder, mask ratio, epochs, ...).

A trial is a pipeline of two stages: pretraining with the trial's settings, then the cheap
evaluation, a linear probe on one transfer stage's data. Each trial is an MLflow pipeline
run nested under one sweep run, carrying the swept settings as params (``method``,
``model``, ``mask_ratio``, ``epochs``, ...) and metrics ``pretrain_flops`` and
``probe_top1``, so selecting the trials in the MLflow UI's compare view plots FLOPs against
accuracy directly. Trials are named from their settings, so a resumed sweep resumes each
trial's stages from their checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml
from mlflow.tracking import MlflowClient
from pydantic import Field, ValidationError, model_validator

from pipelines.config import (
    METHOD_RECIPES, ConfigError, PipelineConfig, Strict, _format, _set_dotted, absolute, load_config, parse_override,
)
from pipelines.tracking import KIND, RunLogger, ensure_experiment, resolve_tracking_uri, start_or_resume

PROBE_METRIC = "probe_top1"
FLOPS_METRIC = "pretrain_flops"
ASHA_METRIC = "train/loss"
"""ASHA compares trials by pretraining loss at equal checkpoint counts (the probe runs once,
at the end); it suits searches at one mask ratio, since the loss scale depends on it."""


class Grid(Strict):
    grid: list[Any] = Field(min_length=1)


class Choice(Strict):
    choice: list[Any] = Field(min_length=1)


class Uniform(Strict):
    uniform: tuple[float, float]


class Cases(Strict):
    cases: list[dict[str, Any]] = Field(
        min_length=1, description="sets of pretrain fields tried together, e.g. {method: mae, model: ...}"
    )


Space = Union[Grid, Choice, Uniform, Cases]


class Probe(Strict):
    stage: str = Field(description="a classification stage of the base config whose data the probe reads")
    epochs: float = Field(10, gt=0)
    base_lr: float = Field(0.1, gt=0)
    batch_size: Optional[int] = Field(None, gt=0)


class Asha(Strict):
    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1, description="checkpoint reports before a trial may be stopped")
    reduction_factor: float = Field(2, gt=1)


class SweepConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field(description="pipeline config the trials start from (relative to this file)")
    overrides: list[str] = Field(default_factory=list, description="key=value applied to the base")
    search: dict[str, Space] = Field(
        description="pretrain fields to vary (mask_ratio, epochs, ...); a 'cases' space varies several together under any name"
    )
    num_samples: int = Field(1, ge=1, description="repeats of the grid (or samples of random spaces)")
    probe: Probe
    scheduler: Optional[Asha] = None
    max_concurrent_trials: int = Field(1, ge=1)
    trial_cpus: float = Field(0.1, ge=0, description="CPU of each trial's driver (its Train workers add their own)")
    storage: str = "mixmae_runs/sweeps"

    @model_validator(mode="after")
    def _known_fields(self):
        from pipelines.config import PretrainStage

        named = [key for key, space in self.search.items() if not isinstance(space, Cases)]
        named += [key for space in self.search.values() if isinstance(space, Cases) for case in space.cases for key in case]
        unknown = sorted(set(named) - set(PretrainStage.model_fields))
        if unknown:
            raise ValueError(f"search names unknown pretrain fields {unknown}")
        return self

    def pretrain_fields(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's sampled ``params`` as pretrain fields (the fields of a case, merged)."""
        out: dict[str, Any] = {}
        for key, value in params.items():
            out.update(value if isinstance(self.search[key], Cases) else {key: value})
        return out


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> tuple[SweepConfig, PipelineConfig]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"sweep config not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        _set_dotted(raw, *parse_override(item))
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format(exc, str(path))) from None
    base = load_config((path.parent / sweep.base).resolve(), sweep.overrides)
    probe = base.stages.get(sweep.probe.stage)
    if probe is None or probe.task != "classify":
        raise ConfigError(f"probe.stage {sweep.probe.stage!r} must name a classification stage of {sweep.base}")
    return sweep, base


def trial_config(base: PipelineConfig, sweep: SweepConfig, params: dict[str, Any]) -> PipelineConfig:
    """The two-stage pipeline of one trial: pretraining with ``params``, then the linear probe."""
    raw = base.model_dump(mode="json")
    fields = sweep.pretrain_fields(params)
    if "method" in fields:  # what the base took from its method's recipe follows the trial's method
        before, after = METHOD_RECIPES[base.pretrain.method], METHOD_RECIPES[fields["method"]]
        for key, value in after.items():
            if key not in fields and json.dumps(raw["pretrain"][key]) == json.dumps(before[key], default=list):
                raw["pretrain"][key] = value
    raw["pretrain"].update(fields)
    probe = dict(raw["stages"][sweep.probe.stage])
    probe.update(
        mode="linear_probe", optimizer="lars", weight_decay=0.0, layer_decay=None, epochs=sweep.probe.epochs,
        base_lr=sweep.probe.base_lr, init="pretrained",
    )
    if sweep.probe.batch_size:
        probe["batch_size"] = sweep.probe.batch_size
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    raw.update(name=f"{sweep.name}-{digest}", stages={"probe": probe}, stage_groups=[], max_parallel_stages=1)
    return PipelineConfig.model_validate(raw)


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

    from pipelines.pipeline import run_pipeline

    sweep = SweepConfig.model_validate(config["sweep"])
    base = PipelineConfig.model_validate(config["base"])
    params = {key: config[key] for key in sweep.search}
    trial = trial_config(base, sweep, params)
    callbacks = {}
    if sweep.scheduler is not None:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks["pretrain"] = [TuneReportCallback()]  # ASHA rungs: pretraining checkpoints
    outcome = run_pipeline(trial, parent_run_id=config["sweep_run_id"], callbacks=callbacks)
    pretrain, probe = outcome.stages
    metrics = {
        FLOPS_METRIC: pretrain.metrics.get("flops/train_total", float("nan")),
        PROBE_METRIC: probe.metrics.get("val/top1", float("nan")),
        ASHA_METRIC: pretrain.metrics.get(ASHA_METRIC, float("nan")),
    }
    logger = RunLogger(outcome.tracking_uri, outcome.run_id)
    logger.params(sweep.pretrain_fields(params))
    logger.metrics(metrics, 0)
    tune.report({**metrics, "mlflow_run_id": outcome.run_id})


def run_sweep(sweep: SweepConfig, base: PipelineConfig, resume: bool = True):
    """Run (or resume) the sweep; returns Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipelines.pipeline import init_ray

    uri = resolve_tracking_uri(base.tracking.uri)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, base.tracking.experiment, Path.cwd() / "mlartifacts")
    sweep_run = start_or_resume(client, experiment_id, sweep.name, {KIND: "sweep"})
    RunLogger(uri, sweep_run.info.run_id).params({f"search.{k}": json.dumps(v.model_dump()) for k, v in sweep.search.items()})
    init_ray(base)
    storage = absolute(sweep.storage)
    # trials run in their own directories: every path and the store must be absolute
    base = base.resolved()
    base = base.model_copy(update={"tracking": base.tracking.model_copy(update={"uri": uri})})
    param_space = {
        **{key: _space(spec) for key, spec in sweep.search.items()},
        "sweep": sweep.model_dump(mode="json"),
        "base": base.model_dump(mode="json"),
        "sweep_run_id": sweep_run.info.run_id,
    }
    trainable = tune.with_resources(_trial, {"CPU": sweep.trial_cpus})
    path = storage / sweep.name
    if resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        scheduler = None
        if sweep.scheduler is not None:
            scheduler = ASHAScheduler(
                metric=ASHA_METRIC, mode="min", time_attr="training_iteration",
                grace_period=sweep.scheduler.grace_period, reduction_factor=sweep.scheduler.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent_trials, scheduler=scheduler
            ),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage), verbose=0),
        )
    grid = tuner.fit()
    failed = sum(1 for result in grid if result.error)
    RunLogger(uri, sweep_run.info.run_id).tags({"mixmae.failed_trials": failed})
    client.set_terminated(sweep_run.info.run_id, "FAILED" if failed else "FINISHED")
    return sweep_run.info.run_id, grid


def trial_error(result) -> str:
    """Why a trial failed, in one line (its pipeline's own message, without Ray's wrapping)."""
    text = str(result.error)
    cause = [line for line in text.splitlines() if line.startswith(("pipelines.", "StageError"))]
    return (cause[-1].split(": ", 1)[-1] if cause else text.splitlines()[-1] if text else "failed")[:500]
