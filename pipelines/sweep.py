"""Ray Tune sweeps over pretraining settings (method and encoder, mask ratio, epochs, ...),
every setting once per seed.

A trial is a pipeline of two stages: pretraining with the trial's settings and seed (its
k-NN monitor scoring the encoder along the way), then the cheap evaluation, a linear probe
on one transfer stage's data with the same seed. Runs with one seed see the same images in
the same order, so the seeds of two settings pair up. Each trial is an MLflow pipeline run
nested under one sweep run, named by its settings in words
(``methods-mixmae-swin_micro_w8-s1``) and carrying them as params (``seed``, ``method``,
``encoder``, the swept fields, ``sweep``, ``trial``: the setting without the seed) and
metrics ``pretrain_flops``, ``knn_top1`` and ``probe_top1``: the MLflow UI groups the runs
by setting and aggregates the seeds, and ``mixmae report`` says which differences are above
the noise. A resumed sweep resumes each trial's stages from their checkpoints.

ASHA stops trials by the monitor's ``eval/knn_top1`` (comparable across methods and mask
ratios) at each evaluation; by the pretraining loss only for searches at one mask ratio
and method, whose losses are comparable.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipelines.config import ConfigError, PipelineConfig, _format, apply_overrides, load_config
from pipelines.stage_config import METHOD_RECIPES, Strict, checked_uri


PROBE_METRIC = "probe_top1"
FLOPS_METRIC = "pretrain_flops"
KNN_METRIC = "knn_top1"
#: trial names longer than this end in a short hash of the rest
MAX_NAME = 80


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
    metric: Literal["knn", "loss"] = Field(
        "knn", description="'knn': the monitor's eval/knn_top1 at each evaluation (needs pretrain.monitor); "
        "'loss': train/loss at each checkpoint (searches at one mask ratio and method only)",
    )
    grace_period: int = Field(1, ge=1, description="evaluations (checkpoints for 'loss') before a trial may be stopped")
    reduction_factor: float = Field(2, gt=1)

    def target(self) -> tuple[str, str, str]:
        """What ASHA compares, in which direction, and on what time axis."""
        if self.metric == "knn":
            return "eval/knn_top1", "max", "evaluations"
        return "train/loss", "min", "training_iteration"


class SweepConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field(description="pipeline config the trials start from (relative to this file)")
    overrides: list[str] = Field(default_factory=list, description="key=value applied to the base")
    search: dict[str, Space] = Field(
        description="pretrain fields to vary (mask_ratio, epochs, ...); a 'cases' space varies several together under any name"
    )
    seeds: list[int] = Field([0], min_length=1, description="every point of the search runs once per seed")
    num_samples: int = Field(
        1, ge=1, description="samples of random spaces (choice, uniform); a setting drawn twice is trained once"
    )
    probe: Probe
    scheduler: Optional[Asha] = None
    max_concurrent_trials: int = Field(1, ge=1)
    trial_cpus: float = Field(0.1, ge=0, description="CPU of each trial's driver (its Train workers add their own)")
    storage: str = Field("mixmae_runs/sweeps", description="Tune's state: a folder, or s3://bucket/prefix")

    @field_validator("storage")
    @classmethod
    def _storage_uri(cls, v: str) -> str:
        return checked_uri(v)

    @model_validator(mode="after")
    def _known_fields(self):
        from pipelines.stage_config import PretrainStage

        named = [key for key, space in self.search.items() if not isinstance(space, Cases)]
        named += [key for space in self.search.values() if isinstance(space, Cases) for case in space.cases for key in case]
        unknown = sorted(set(named) - set(PretrainStage.model_fields))
        if unknown:
            raise ValueError(f"search names unknown pretrain fields {unknown}")
        if "seed" in named:
            raise ValueError("search the seed with seeds: [...], so trials of one setting pair up by seed")
        random = any(isinstance(space, (Choice, Uniform)) for space in self.search.values())
        if self.num_samples > 1 and not random:
            raise ValueError(
                f"num_samples: {self.num_samples} would repeat the same grid with the same seed (same data, same "
                "result); give seeds: [0, 1, 2] for replicates instead"
            )
        if random and len(self.seeds) > 1:
            raise ValueError(
                "a random search (choice, uniform) draws each trial's settings anew, so its seeds would not be "
                "replicates of one setting; search a grid or cases with seeds, or give one seed"
            )
        if self.scheduler is not None and self.scheduler.metric == "loss":
            compared = {"mask_ratio", "method"} & set(named)
            if compared:
                raise ValueError(
                    f"ASHA on the pretraining loss cannot compare trials of different {' and '.join(sorted(compared))}: "
                    "their losses are on other scales; use scheduler.metric: knn (the k-NN monitor's accuracy)"
                )
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
    raw = apply_overrides(yaml.safe_load(path.read_text()) or {}, overrides)
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format(exc, str(path))) from None
    base = load_config((path.parent / sweep.base).resolve(), sweep.overrides)
    probe = base.stages.get(sweep.probe.stage)
    if probe is None or probe.task != "classify":
        raise ConfigError(f"probe.stage {sweep.probe.stage!r} must name a classification stage of {sweep.base}")
    if sweep.scheduler is not None and sweep.scheduler.metric == "knn" and base.pretrain.monitor is None:
        raise ConfigError(
            f"{path}: ASHA on accuracy needs the base config's pretrain.monitor (the k-NN monitor); add one, "
            "or set scheduler.metric: loss for a search at one mask ratio and method"
        )
    return sweep, base


def trial_config(base: PipelineConfig, sweep: SweepConfig, params: dict[str, Any], seed: int) -> PipelineConfig:
    """The two-stage pipeline of one trial: pretraining with ``params`` and ``seed``, then the
    linear probe with the same seed (in the pretraining's worker group if their scaling is the same)."""
    raw = base.model_dump(mode="json")
    fields = sweep.pretrain_fields(params)
    if "method" in fields:  # what the base took from its method's recipe follows the trial's method
        before, after = METHOD_RECIPES[base.pretrain.method], METHOD_RECIPES[fields["method"]]
        for key, value in after.items():
            if key not in fields and json.dumps(raw["pretrain"][key]) == json.dumps(before.get(key), default=list):
                raw["pretrain"][key] = value
    raw["pretrain"].update(fields, seed=seed)
    probe = dict(raw["stages"][sweep.probe.stage])
    probe.update(
        mode="linear_probe", optimizer="lars", weight_decay=0.0, layer_decay=None, epochs=sweep.probe.epochs,
        base_lr=sweep.probe.base_lr, init="pretrained", seed=seed,
    )
    if sweep.probe.batch_size:
        probe["batch_size"] = sweep.probe.batch_size
    # the probe trains in the pretraining's worker group when it can: one group start a trial
    together = probe["scaling"] == raw["pretrain"]["scaling"]
    raw.update(name=trial_name(sweep, params, seed), stages={"probe": probe}, max_parallel_stages=1,
               stage_groups=[["pretrain", "probe"]] if together else [])
    return PipelineConfig.model_validate(raw)


def setting_name(sweep: SweepConfig, params: dict[str, Any]) -> str:
    """A trial's settings in words, without its seed: ``methods-mixmae-swin_micro_w8``,
    ``mask-ratio-epochs-mask_ratio0.5-epochs4``; past :data:`MAX_NAME` characters the end is
    a short hash of the whole."""
    words = []
    for key, value in params.items():
        if isinstance(sweep.search[key], Cases):
            words += [_word(v) for v in value.values()]
        else:
            words.append(f"{key}{_word(value)}")
    name = "-".join([sweep.name, *words])
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}-{digest}"
    return name


def trial_name(sweep: SweepConfig, params: dict[str, Any], seed: int) -> str:
    return f"{setting_name(sweep, params)}-s{seed}"


def trial_label(config: dict[str, Any]) -> str:
    """The name of the trial with Tune config ``config``: its settings in words and its seed."""
    sweep = SweepConfig.model_validate(config["sweep"])
    return trial_name(sweep, {key: config[key] for key in sweep.search}, config["seed"])


def _word(value: Any) -> str:
    """A value as a name part: encoders without the ``mixmae_`` prefix, anything else in the
    characters a pipeline name may hold."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text.removeprefix("mixmae_")).strip("_")


def trial_error(error: BaseException) -> str:
    """Why a trial failed, in one line (its pipeline's own message, without Ray's wrapping)."""
    text = str(error)
    cause = [line for line in text.splitlines() if line.startswith(("pipelines.", "StageError"))]
    return (cause[-1].split(": ", 1)[-1] if cause else text.splitlines()[-1] if text else "failed")[:500]
