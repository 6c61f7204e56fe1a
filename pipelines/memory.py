"""A stage model's memory costs, measured on the meta device (what :mod:`pipelines.worker_memory`
turns into one worker's bytes).

Activations: one training forward of the stage's model runs on meta tensors (shapes only: no
memory, no arithmetic), and the bytes of the tensors autograd saves for backward are added
up, each storage once, weights left out. What the batch makes is told from what the weights
alone make (bf16 weight copies, bias tables) by following which storages the batch's values
flow into (:class:`FromBatch`), so one small batch gives both parts and the first scales to
the micro-batch. With activation checkpointing the forward runs again, and the blocks it
recomputes are those that saved tensors without it and none with it.

A GPU stage is measured as CUDA runs it (:class:`AsOnCuda`): meta tensors know neither
autocast (it acts on CPU and CUDA tensors only) nor the memory-efficient attention kernel
(torch picks its math path for them, which saves the probabilities in fp32), so both are
reproduced at the level of torch's functions, above autograd as autocast itself is.
torch.compile (``fast``) is not modelled: compiled steps save less.
"""
from __future__ import annotations

import importlib
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from mixmae_core.encoders.base import apply_grad_checkpointing
from pipelines.stages.distributed import sharding_units
from pipelines.worker_memory import Activations, ModelCosts, PerBatch, fast_path

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig
    from pipelines.stage_config import DetectStage, StageBase

SMALL_BATCH = 2
"""The batch the activations are measured at (even: pretraining takes pairs; above one: BatchNorm)."""


# ----------------------------------------------------------------------------- CUDA's choices, on meta tensors

#: CUDA autocast's op lists (torch's "Autocast Op Reference"), by the name torch functions and
#: Tensor methods carry: the first run in bf16, the second in fp32; the rest in their inputs' type.
CUDA_BF16_OPS = frozenset({
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "mv", "bmm", "baddbmm", "addmm", "addmv", "addbmm",
    "einsum", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu",
    "scaled_dot_product_attention",
})
CUDA_FP32_OPS = frozenset({
    "layer_norm", "group_norm", "softmax", "log_softmax", "softmin", "cross_entropy", "nll_loss", "mse_loss",
    "l1_loss", "smooth_l1_loss", "binary_cross_entropy_with_logits", "kl_div", "norm", "normalize",
    "cosine_similarity", "exp", "expm1", "log", "log1p", "log2", "log10", "pow", "__pow__", "__rpow__", "rsqrt",
    "reciprocal", "sum", "prod", "cumsum", "cumprod", "softplus", "acos", "asin", "cosh", "sinh", "tan", "erfinv",
})


def efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """``scaled_dot_product_attention`` through the memory-efficient kernel, as CUDA runs it
    with an additive bias (and saves what it saves: q, k, v, the output, the log-sum-exp and
    the bias, its rows padded to 8 as ``preprocess_mask`` pads them); on the meta device torch
    would take the math path, which saves the probabilities in fp32."""
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=query.dtype, device=bias.device).masked_fill(~bias, float("-inf"))
    if bias is not None:
        keys = key.shape[-2]
        if keys % 8:
            bias = F.pad(bias, (0, 8 - keys % 8))[..., :keys]
        bias = bias.expand(*query.shape[:-1], keys)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, bias))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, grad, dropout_p, is_causal, scale=scale
    )[0]


class AsOnCuda(TorchFunctionMode):
    """Torch functions as a CUDA device runs them, for tensors on any device: attention through
    :func:`efficient_attention`, and with ``bf16`` CUDA's bf16 autocast by op name (arguments
    of the ``bf16`` ops cast to bfloat16, each weight once per forward as autocast caches it,
    those of the ``fp32`` ops to float32). Above autograd, as autocast is: autograd saves the copies."""

    def __init__(self, bf16: bool, bf16_ops: frozenset = CUDA_BF16_OPS, fp32_ops: frozenset = CUDA_FP32_OPS):
        super().__init__()
        self.bf16_ops, self.fp32_ops = (bf16_ops, fp32_ops) if bf16 else (frozenset(), frozenset())
        self.weights: dict[int, torch.Tensor] = {}

    def _cast(self, dtype: torch.dtype, source: torch.dtype):
        def cast(t):
            if not isinstance(t, torch.Tensor) or t.dtype != source:
                return t
            if t.is_leaf and t.requires_grad:
                if id(t) not in self.weights:
                    self.weights[id(t)] = t.to(dtype)
                return self.weights[id(t)]
            return t.to(dtype)

        return cast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.bf16_ops:
            args, kwargs = tree_map(self._cast(torch.bfloat16, torch.float32), (args, kwargs))
        elif name in self.fp32_ops:
            args, kwargs = tree_map(self._cast(torch.float32, torch.bfloat16), (args, kwargs))
        if name == "scaled_dot_product_attention":
            return efficient_attention(*args, **kwargs)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- measuring


def _storage(t: torch.Tensor):
    return t.untyped_storage()._cdata


def _static(model: nn.Module) -> set[int]:
    return {_storage(t) for t in (*model.parameters(), *model.buffers())}


class FromBatch(TorchDispatchMode):
    """Which storages hold values computed from the batch: the inputs', and the outputs of
    every op that reads one of them. It keeps them referenced, so that no other storage takes
    their place (and key) while it runs: for meta tensors, which hold no memory."""

    def __init__(self, inputs: Iterator[torch.Tensor]):
        super().__init__()
        self.storages = {_storage(t): t.untyped_storage() for t in inputs}

    def __contains__(self, t: torch.Tensor) -> bool:
        return _storage(t) in self.storages

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t in self for t in tree_flatten((args, kwargs))[0]):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.storages.setdefault(_storage(t), t.untyped_storage())
        return out


@dataclass(frozen=True)
class Saved:
    """What one training forward left saved for backward."""

    total: PerBatch
    """Each storage once, split into what the weights alone make and what the batch makes."""
    by_module: dict[str, PerBatch]
    """Per module (qualified name), what was first saved while it ran."""


def saved_for_backward(model: nn.Module, forward: Callable[[], torch.Tensor], inputs: Iterator[torch.Tensor],
                       batch: int) -> Saved:
    """Run ``forward()`` on the batch ``inputs`` of ``batch`` samples and count the storages
    autograd saves, leaving ``model``'s weights out."""
    static, seen = _static(model), set()
    names = {id(module): name for name, module in model.named_modules()}
    running: list[str] = []
    saved: dict[Optional[str], PerBatch] = {}
    from_batch = FromBatch(inputs)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage(t)
        if key not in static and key not in seen:
            seen.add(key)
            n = t.untyped_storage().nbytes()
            cost = PerBatch(per_sample=n / batch) if t in from_batch else PerBatch(fixed=n)
            for name in (None, *running):
                saved[name] = saved.get(name, PerBatch()) + cost
        return t

    def enter(module, _args):
        if id(module) in names:
            running.append(names[id(module)])

    def leave(module, _args, _out):
        if id(module) in names:
            running.pop()

    hooks = [nn.modules.module.register_module_forward_pre_hook(enter),
             nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    try:
        with from_batch, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    total = saved.pop(None, PerBatch())
    return Saved(total, saved)


def checkpointed_blocks(plain: Saved, checkpointed: Saved) -> list[str]:
    """The modules checkpointing recomputes: those that saved tensors without it and none
    with it (inside a checkpoint autograd saves into the checkpoint's own hooks), outermost only."""
    quiet = {name for name in plain.by_module if name not in checkpointed.by_module}
    return [name for name in quiet if not any(name.startswith(other + ".") for other in quiet)]


def measure_activations(model: nn.Module, inputs: Callable[[int], tuple[torch.Tensor, ...]],
                        loss: Callable[..., torch.Tensor], cuda: bool, bf16: bool, batch: int = SMALL_BATCH,
                        ) -> Activations:
    """Activations of ``loss(*inputs(batch))``, one training forward of ``model`` on meta
    tensors, with checkpointing off and on; ``cuda``: as a CUDA device runs it (:class:`AsOnCuda`)."""

    def run(checkpointing: bool) -> Saved:
        apply_grad_checkpointing(model, checkpointing)
        batch_inputs = inputs(batch)
        with AsOnCuda(bf16) if cuda else nullcontext():
            return saved_for_backward(model, lambda: loss(*batch_inputs), [t for t in batch_inputs if t is not None],
                                      batch)

    model.train()
    checkpointed, plain = run(True), run(False)
    blocks = tuple(plain.by_module[name] for name in checkpointed_blocks(plain, checkpointed))
    return Activations(plain=plain.total, kept=checkpointed.total, blocks=blocks)


class LiveTensors(TorchDispatchMode):
    """The bytes of tensor storages alive while it is on, and their peak: every storage enters
    as the output of an op (the weights and anything made before are counted by ``known``)
    and leaves when Python frees it. On the CPU, which has no caching allocator, this is the
    memory torch holds for tensors; on the meta device it is what the same run would hold."""

    def __init__(self, known: Iterator[torch.Tensor] = ()):
        super().__init__()
        self.live = {_storage(t): 0 for t in known}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage(t) not in self.live:
                storage = t.untyped_storage()
                self.live[_storage(t)] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, _storage(t))
        return out


def measured_peak(model: nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Peak bytes of the tensors made during ``step().backward()`` (``step`` makes its inputs
    and returns the loss), the weights of ``model`` not counted: the gradients it makes are."""
    with LiveTensors([*model.parameters(), *model.buffers()]) as live:
        step().backward()
    return live.peak


@dataclass(frozen=True)
class PeakCheck:
    """The estimate of a pretraining step against its measured peak on the CPU (fp32), in bytes."""

    activations: float
    """Estimated on the meta device."""
    gradients: int
    measured: int
    """Peak of the tensors made during a real forward and backward (:func:`measured_peak`)."""


def check_pretraining_peak(encoder: str, img_size: int, batch: int, checkpointing: bool) -> PeakCheck:
    """MixMAE pretraining on ``encoder`` at ``batch``: the activations this module estimates
    (measured at ``SMALL_BATCH``, scaled), against the peak measured while the same step
    trains on the CPU. Between the two lie the gradients backward makes while it frees
    activations: the peak falls between the estimate and the estimate plus the gradients (the
    bound the plan adds up), less whatever of the estimate is never live at once."""
    from mixmae_core.methods import create_pretraining_model

    with torch.device("meta"):
        meta = create_pretraining_model("mixmae", encoder, img_size=img_size)
    estimate = measure_activations(meta, pretraining_inputs(meta, img_size), lambda x, m: meta(x, m).loss, cuda=False, bf16=False)
    model = apply_grad_checkpointing(create_pretraining_model("mixmae", encoder, img_size=img_size), checkpointing)
    inputs = pretraining_inputs(model, img_size, device="cpu")
    measured = measured_peak(model.train(), lambda: model(*inputs(batch)).loss)
    return PeakCheck(estimate.at(batch, checkpointing), sum(p.numel() * 4 for p in model.parameters()), measured)


# ----------------------------------------------------------------------------- stages


class StaticDetector(nn.Module):
    """Mask R-CNN's compute with its RoI counts fixed, so that it runs on the meta device
    (torchvision's proposal sampling and NMS depend on values): the backbone and FPN, the RPN
    head on every level, the box head on ``rois`` RoIs per image and the mask head on
    ``masks``. Its output, a scalar that depends on every head's output, stands in for the losses."""

    def __init__(self, detector: nn.Module, rois: int, masks: int):
        super().__init__()
        self.detector, self.rois, self.masks = detector, rois, masks

    def set_attn_impl(self, name: str) -> None:
        self.detector.set_attn_impl(name)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        detector = self.detector
        features = detector.backbone(images)
        objectness, deltas = detector.rpn.head(list(features.values()))
        heads, n, channels = detector.roi_heads, images.shape[0], detector.backbone.out_channels
        outputs = [*objectness, *deltas]
        for count, pool, head, predictor in (
            (self.rois, heads.box_roi_pool, heads.box_head, heads.box_predictor),
            (self.masks, heads.mask_roi_pool, heads.mask_head, heads.mask_predictor),
        ):
            if count:
                out = predictor(head(images.new_zeros(n * count, channels, *pool.output_size)))
                outputs += list(out) if isinstance(out, tuple) else [out]
        return sum(out.float().mean() for out in outputs)


def transfer_model(config: "PipelineConfig", name: str, spec: "StageBase", num_classes: int) -> nn.Module:
    """A transfer stage's task model as its worker builds it, on the meta device."""
    from pipelines.stages.jobs import StageJob

    job = StageJob(name=name, spec=spec, model=config.stage_model(spec), num_classes=num_classes)
    with torch.device("meta"):
        return importlib.import_module(f"pipelines.stages.{spec.task}").TASK(job).build_model()


def pretraining_inputs(
    model: nn.Module, img_size: int, device: str = "meta"
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """A pretraining model's batches: images on ``device``, each row's masks on the CPU drawn
    by the method's own spec, as the data brings them."""
    spec = getattr(model, "_orig_mod", model).mask_spec
    return lambda n: (torch.randn(n, 3, img_size, img_size, device=device), spec.draw_rows(range(n // 2)))


def _training_inputs(spec: "StageBase", model: nn.Module) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """Batches of the stage's training inputs on the meta device."""
    from pipelines.stage_config import DetectStage, PretrainStage

    if isinstance(spec, PretrainStage):
        return pretraining_inputs(model, spec.img_size)

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        images = torch.randn(batch, 3, spec.img_size, spec.img_size, device="meta")
        if isinstance(spec, DetectStage):
            return (images,)
        labels = (batch,) if spec.task == "classify" else (batch, spec.img_size, spec.img_size)
        return images, torch.zeros(labels, dtype=torch.long, device="meta")

    return inputs


def _training_loss(spec: "StageBase", model: nn.Module) -> Callable[..., torch.Tensor]:
    """The training loss of the stage's model on :func:`_training_inputs` (a detector's: its outputs)."""
    from pipelines.stage_config import DetectStage, PretrainStage

    if isinstance(spec, PretrainStage):
        return lambda images, masks: model(images, masks).loss
    if isinstance(spec, DetectStage):
        return model
    return lambda images, labels: F.cross_entropy(model(images), labels)


def _training_detector(spec: "DetectStage", detector: nn.Module) -> StaticDetector:
    """A detector's training compute: the box head on every sampled RoI, the mask head on the
    positive ones (at most the sampler's positive share of them)."""
    positives = int(spec.rois_per_image * detector.roi_heads.fg_bg_sampler.positive_fraction)
    return StaticDetector(detector, spec.rois_per_image, positives)


def measure_model(model: nn.Module, inputs: Callable[[int], tuple[torch.Tensor, ...]],
                  loss: Callable[..., torch.Tensor], cuda: bool, bf16: bool) -> ModelCosts:
    """``model``'s costs, its activations measured as :func:`measure_activations` does."""
    return ModelCosts(
        weights=sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad) * 4,
        activations=measure_activations(model, inputs, loss, cuda=cuda, bf16=bf16),
        bf16=bf16,
        largest_unit=max((sum(p.numel() * 4 for p in unit.parameters()) for unit in sharding_units(model)), default=0),
    )


def model_costs(config: "PipelineConfig", name: str, spec: "StageBase", num_classes: int) -> ModelCosts:
    """Build the stage's model on the meta device as its worker does, and measure it."""
    from mixmae_core.fast import StepOptions, apply_step_options
    from mixmae_core.methods import create_pretraining_model
    from pipelines.stage_config import DetectStage, PretrainStage

    gpu = spec.scaling.use_gpu
    if isinstance(spec, PretrainStage):
        with torch.device("meta"):
            model = create_pretraining_model(spec.method, config.stage_model(spec), img_size=spec.img_size,
                                             mask_ratio=spec.mask_ratio, **spec.method_options(),
                                             **spec.model_tokenizer(), **spec.model_overrides)
        options = StepOptions.fast(torch.device("cuda" if gpu else "cpu")) if spec.fast else StepOptions()
        model = apply_step_options(model, replace(options, compile="off"))
    else:
        model = transfer_model(config, name, spec, num_classes)
        if isinstance(spec, DetectStage):
            model = _training_detector(spec, model)
    return measure_model(model, _training_inputs(spec, model), _training_loss(spec, model), cuda=gpu,
                         bf16=fast_path(spec))
