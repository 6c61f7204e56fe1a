"""Pipeline configuration: YAML files validated once, at load, by pydantic.

One schema serves every command: ``mixmae run`` runs ``pretrain`` and then ``stages``
in order, ``mixmae pretrain`` runs only ``pretrain``. Defaults are the paper's recipes
(the README's "Configs" section lists them); a wrong key, type or value fails at load
with one message naming the field. Relative paths are resolved against the working
directory. The stages' sections are :mod:`pipelines.stage_config`'s; this module holds the
pipeline around them (storage, tracking, Ray, stage groups), the overrides and the loading,
and like it imports neither torch nor timm at load.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipelines.stage_config import (
    SYNTHETIC_PREFIX, URI_ERROR, DataSpec, PretrainStage, StageBase, Strict, TokenizerStage, TransferBase, TransferStage,
    checked_uri,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "ray_configs" / "pipelines" / "quickstart.yaml"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field."""


class Tracking(Strict):
    uri: Optional[str] = Field(None, description="MLFLOW_TRACKING_URI wins; default sqlite:///<cwd>/mlflow.db")
    experiment: str = "mixmae"
    system_metrics: bool = Field(True, description="CPU, memory, disk, network and GPU of each stage's nodes")
    system_metrics_every_s: float = Field(10.0, gt=0, description="seconds between two samples of system metrics")
    registered_model: Optional[str] = Field(
        None, description="register the pretrained encoder under this name in the Model Registry"
    )
    delivery_wait_s: float = Field(
        120.0, gt=0, description="after a stage, how long to wait for a tracking server that is away "
        "before failing the stage with its records spooled (`mixmae sync` delivers them)",
    )


class RaySettings(Strict):
    address: Optional[str] = Field(None, description="None: RAY_ADDRESS or a new local cluster")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of a new local cluster")

    def cluster(self) -> Optional[str]:
        """The cluster to join, or None for a private local one: never whatever address file
        a ``ray start`` left on the machine (its head may be long dead)."""
        return self.address or os.environ.get("RAY_ADDRESS") or None


class Synthetic(Strict):
    root: str = ".mixmae/synthetic"
    scale: Literal["tiny", "small"] = "tiny"
    seed: int = 0


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    storage: str = Field(
        "mixmae_runs", description="checkpoints, manifests, logs: a folder every node reaches, or s3://bucket/prefix"
    )
    tracking: Tracking = Field(default_factory=Tracking)
    ray: RaySettings = Field(default_factory=RaySettings)
    synthetic: Optional[Synthetic] = None
    max_parallel_stages: int = Field(
        1, ge=1, description="transfer stages (or stage groups) run at once (they share the cluster)"
    )
    stage_groups: list[list[str]] = Field(
        default_factory=list,
        description="stages that run one after another in one Ray Train worker group, started once (small "
        "stages: the group start costs more than their training); 'pretrain' may open a group, whose transfer "
        "stages then start from the encoder it has just trained",
    )
    pretrain: PretrainStage
    stages: dict[str, TransferStage] = Field(default_factory=dict)

    @field_validator("storage")
    @classmethod
    def _storage_uri(cls, v: str) -> str:
        return checked_uri(v)

    @model_validator(mode="after")
    def _names_and_data(self):
        for name in self.stages:
            if name in ("pretrain", "tokenizer") or not name.replace("_", "").isalnum():
                raise ValueError(f"stage name {name!r} must be alphanumeric (underscores allowed), not 'pretrain' "
                                 "or 'tokenizer'")
        for name, data in self.data_specs():
            if data.root.startswith(SYNTHETIC_PREFIX) and self.synthetic is None:
                raise ValueError(f"{name} reads {data.root} but the config has no 'synthetic' section")
        grouped: list[str] = []
        stages = {"pretrain": self.pretrain, **self.stages}
        for group in self.stage_groups:
            unknown = [name for i, name in enumerate(group) if name not in self.stages and (name, i) != ("pretrain", 0)]
            if unknown or not group:
                raise ValueError(f"stage_groups: {unknown or group} are not transfer stages of this config "
                                 "(pretrain may open a group)")
            if any(stages[name].scaling != stages[group[0]].scaling for name in group):
                raise ValueError(
                    f"stage_groups: {group} share one worker group, so their scaling must be the same "
                    "(or take the stage out of its group)"
                )
            grouped += group
        if len(grouped) != len(set(grouped)):
            raise ValueError(f"stage_groups: a stage may be in one group only (got {self.stage_groups})")
        for name, stage in self.stages.items():
            self._check_encoder(name, stage)
        return self

    def _check_encoder(self, name: str, stage: "TransferBase") -> None:
        """A transfer stage's encoder can serve its task, and its ``init`` checkpoint holds that encoder."""
        from mixmae_core.checkpoint import checkpoint_info
        from mixmae_core.encoders import available_encoders

        model = self.stage_model(stage)
        if stage.task in ("detect", "segment") and model not in available_encoders():
            raise ValueError(
                f"stage {name}: {'detection' if stage.task == 'detect' else 'segmentation'} needs an encoder with "
                f"four levels (one of {available_encoders()}); {model} is a plain ViT. Leave the stage out of a "
                f"pipeline that pretrains with {self.pretrain.method}, or give it a hierarchical encoder and init: random"
            )
        if stage.task == "classify":
            _build_on_meta(model, stage.img_size, json.dumps(stage.model_overrides, sort_keys=True))
        init = Path(stage.init).expanduser()
        if stage.init not in ("pretrained", "random") and init.is_file():
            info = checkpoint_info(init)
            if info.get("model") not in (None, model):
                method = f" pretrained with {info['method']}" if info.get("method") else ""
                raise ValueError(
                    f"stage {name}: init checkpoint {init} holds a {info['model']} encoder{method}; this stage "
                    f"builds {model}. Set stages.{name}.model: {info['model']}, or init a checkpoint of {model}"
                )
        if stage.init == "pretrained" and stage.model and stage.model != self.pretrain.model:
            raise ValueError(
                f"stage {name}: init: pretrained starts from the pretraining stage's {self.pretrain.model} encoder, "
                f"but the stage builds {stage.model}; leave its model unset, or set init: random"
            )

    def resolved(self) -> "PipelineConfig":
        """A copy with every relative path made absolute against the working directory (for
        processes that run elsewhere: Tune trials, Ray job entrypoints); URIs stay as they are."""
        from pipelines import storage

        raw = self.model_dump(mode="json")
        raw["storage"] = storage.absolute(self.storage)
        if self.synthetic is not None:
            raw["synthetic"]["root"] = str(absolute(self.synthetic.root))
        sections = [raw["pretrain"], *raw["stages"].values()] + ([raw["pretrain"]["monitor"]] if self.pretrain.monitor else [])
        for section in sections:
            root = section["data"]["root"]
            if not root.startswith(SYNTHETIC_PREFIX):
                section["data"]["root"] = storage.absolute(root)
        return PipelineConfig.model_validate(raw)

    def all_stages(self) -> dict[str, StageBase]:
        """Every stage in the order they run: BEiT's tokenizer (when the pipeline trains it),
        pretraining, the transfer stages."""
        tokenizer = self.pretrain.tokenizer
        first = {"tokenizer": tokenizer} if isinstance(tokenizer, TokenizerStage) else {}
        return {**first, "pretrain": self.pretrain, **self.stages}

    def data_specs(self) -> list[tuple[str, DataSpec]]:
        """Every dataset the pipeline reads, named by where it is configured."""
        specs = [(f"stage {name}", stage.data) for name, stage in self.all_stages().items()]
        if self.pretrain.monitor is not None:
            specs.append(("pretrain.monitor", self.pretrain.monitor.data))
        return specs

    def group_name(self, stage: str) -> str:
        """The worker group ``stage`` runs in: its stages joined with '+' (a lone stage: its name)."""
        return next(("+".join(group) for group in self.stage_groups if stage in group), stage)

    def worker_groups(self, selected: Sequence[str]) -> list[tuple[str, list[str]]]:
        """The selected stages after the tokenizer as ``(name, stages)`` worker groups: each
        of ``stage_groups`` in its own order (named by its stages joined with '+'), every other
        stage alone; groups in the config order of their first stage, so pretraining's first."""
        out: dict[str, list[str]] = {}
        for name in ["pretrain", *self.stages]:
            group = self.group_name(name)
            members = [member for member in group.split("+") if member in selected]
            if members:
                out.setdefault(group, members)
        return list(out.items())

    def stage_model(self, stage: StageBase) -> str:
        return stage.model or self.pretrain.model


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _format(error: ValidationError, source: str) -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"] if p not in ("classify", "detect", "segment"))
        msg = err["msg"].removeprefix("Value error, ")
        shown = "" if err["type"] in ("missing", URI_ERROR) else f" (got {err['input']!r})"
        lines.append(f"  {loc or '<top>'}: {msg}{shown if len(shown) < 120 else ''}")
    return f"invalid config {source}:\n" + "\n".join(lines)


@lru_cache(maxsize=32)
def _build_on_meta(model: str, img_size: int, overrides: str) -> None:
    """Build a classifier of ``model`` at ``img_size`` on the meta device: the encoder refuses
    sizes its windows do not tile. Once per model and size (the classification stages of a
    config usually share both)."""
    import torch
    import timm

    with torch.device("meta"):
        timm.create_model(model, img_size=img_size, num_classes=2, **json.loads(overrides))


def load_config(
    path: Optional[os.PathLike | str] = None, overrides: Sequence[str] = (), pretrain_only: bool = False
) -> PipelineConfig:
    """The config at ``path`` (default: the quickstart's) with ``--set`` ``overrides``;
    ``pretrain_only``: without its transfer stages (``mixmae pretrain`` checks only what it runs,
    so a config's pretraining can be tried on an encoder its transfer stages do not take)."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    raw = apply_overrides(raw, overrides)
    if pretrain_only:
        raw.update(stages={}, stage_groups=[])
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format(exc, str(path))) from None


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """A copy of YAML-loaded ``raw`` with the ``key.path=value`` ``overrides`` set."""
    raw = _unshared(raw)
    for item in overrides:
        _set_dotted(raw, *parse_override(item))
    return raw


def _unshared(node: Any) -> Any:
    """``node`` with a copy of every mapping and list it holds: YAML's merge keys (``<<: *classify``)
    share the anchored section's nested mappings, so an override of one stage's
    ``scaling.num_workers`` would set every stage's."""
    if isinstance(node, dict):
        return {key: _unshared(value) for key, value in node.items()}
    return [_unshared(item) for item in node] if isinstance(node, list) else node


def absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()
