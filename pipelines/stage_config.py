"""The stages' schemas: each stage's section of a pipeline config (its data, scaling, the
pretraining method and its recipe, the transfer tasks), validated by pydantic at load.

The sections travel to the Ray Train workers as they are, so this module imports neither
torch nor timm at load (the validators that need them import them). How a config file is
read, overridden and resolved is :mod:`pipelines.config`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

Layout = Literal["imagefolder", "inat", "places", "coco", "ade20k"]
SYNTHETIC_PREFIX = "synthetic:"


#: the error type of a refused storage URI, whose value an error message never shows (it may hold a key)
URI_ERROR = "storage_uri"


def checked_uri(value: str) -> str:
    """``value`` if it is a local path or an object store URI without credentials or options."""
    from pipelines.storage import check_uri

    try:
        return check_uri(value)
    except ValueError as exc:
        raise PydanticCustomError(URI_ERROR, str(exc)) from None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataSpec(Strict):
    layout: Layout
    root: str = Field(description="dataset root, or 'synthetic:<name>' for the generated stand-ins")
    train_split: str = "train"
    val_split: str = "val"
    options: dict[str, Any] = Field(default_factory=dict, description="layout reader options")
    max_skip_fraction: float = Field(0.01, ge=0.0, le=1.0)
    num_images: Optional[int] = Field(None, gt=0, description="training images, for `mixmae plan` without the data")

    @field_validator("root")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        return v if v.startswith(SYNTHETIC_PREFIX) else checked_uri(v)


class Scaling(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the last checkpoint")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how the workers are placed on the cluster's nodes (SPREAD: one a node where it can)"
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="'ddp': every worker holds the whole model; 'fsdp': parameters, gradients and optimizer "
        "states sharded over the workers (torch's fully_shard, a unit per transformer block), for a pretraining "
        "model that does not fit one device under DDP (see `mixmae plan --gpu-mem`)",
    )

    @property
    def cpus(self) -> float:
        """The CPUs the worker group takes."""
        return self.num_workers * self.cpus_per_worker


class StageBase(Strict):
    """What every Ray Train stage shares: model, data, schedule, scaling, bookkeeping."""

    model: Optional[str] = Field(None, description="encoder variant (default: the pretraining model)")
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    img_size: int = Field(224, gt=0)
    data: DataSpec
    epochs: float = Field(gt=0)
    max_steps: Optional[int] = Field(None, ge=1, description="stop early (smoke runs)")
    batch_size: int = Field(gt=0, description="global batch over all workers")
    accum_steps: int = Field(1, ge=1)
    base_lr: float = Field(gt=0, description="lr = base_lr * batch_size / 256")
    min_lr: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: Optional[float] = Field(None, gt=0)
    seed: int = 0
    fast: bool = Field(False, description="bf16 autocast, fused AdamW and torch.compile on GPU")
    grad_checkpointing: bool = Field(
        False, description="recompute each encoder block's activations in backward instead of keeping them "
        "(less memory, about a third more encoder compute; `mixmae plan --gpu-mem` says when a stage needs it)",
    )
    log_every_steps: int = Field(10, ge=1)
    checkpoint_every_steps: int = Field(500, ge=1)
    scaling: Scaling = Field(default_factory=Scaling)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: Optional[str]) -> Optional[str]:
        from mixmae_core.encoders import available_encoders
        from mixmae_core.methods import encoder_kind

        if v is not None and encoder_kind(v) is None:
            raise ValueError(
                f"unknown model {v!r}; choose one of {available_encoders()}, a timm ViT (for MAE) "
                "or a timm BEiT (for BEiT)"
            )
        return v

    @field_validator("img_size")
    @classmethod
    def _stride(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"img_size must be a multiple of the encoder stride 32, got {v}")
        return v

    @model_validator(mode="after")
    def _batch_divides(self):
        per_step = self.scaling.num_workers * self.accum_steps
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} must divide evenly over num_workers x accum_steps = {per_step}"
            )
        return self

    def micro_batch(self) -> int:
        return self.batch_size // (self.scaling.num_workers * self.accum_steps)


#: Each method's pretraining recipe from its paper (ImageNet-1K, its base encoder). ``base_lr``
#: is per 256 images. MixMAE: Swin-B/W14, 600 epochs (its paper's best). SimMIM: Swin-B,
#: 800 epochs, lr 1e-4 per 512 images (5e-5 per 256), 10 warm-up epochs, AdamW (0.9, 0.999);
#: its step decay at epoch 700 is the pipeline's cosine here. MAE: ViT-B/16, 800 epochs
#: (its paper's ablation length; 1600 for its best), 40 warm-up epochs, AdamW (0.9, 0.95).
#: BEiT: ViT-B/16, 800 epochs, lr 1.5e-3 at batch 2,048, 10 warm-up epochs, AdamW (0.9, 0.999),
#: gradient clipping 3.0, 75 of the 14x14 patches masked in blocks; its drop path (0.1), layer
#: scale (0.1, the variant's own) and shared relative position bias are the encoder's
#: (``mixmae_core/beit.py: PRETRAIN_ENCODER``).
METHOD_RECIPES: dict[str, dict[str, Any]] = {
    "mixmae": dict(model="mixmae_swin_base_w14", mask_ratio=0.5, epochs=600, base_lr=1.5e-4, warmup_epochs=40,
                   betas=(0.9, 0.95)),
    "simmim": dict(model="mixmae_swin_base_w14", mask_ratio=0.6, epochs=800, base_lr=5e-5, warmup_epochs=10,
                   betas=(0.9, 0.999)),
    "mae": dict(model="vit_base_patch16_224", mask_ratio=0.75, epochs=800, base_lr=1.5e-4, warmup_epochs=40,
                betas=(0.9, 0.95)),
    "beit": dict(model="beit_base_patch16_224", mask_ratio=75 / 196, epochs=800, base_lr=1.5e-3 * 256 / 2048,
                 warmup_epochs=10, betas=(0.9, 0.999), clip_grad=3.0),
}


class Monitor(Strict):
    """Accuracy along the pretraining: a weighted k-NN classifier (DINO's, as solo-learn's) on
    the encoder's pooled, L2-normalised features of a labelled dataset: its train split is the
    memory, its validation split is scored. Cheap (forward passes only), and comparable across
    methods and mask ratios, unlike the pretraining loss."""

    data: DataSpec = Field(description="a labelled dataset (classification layout)")
    k: int = Field(20, ge=1, description="neighbours that vote")
    temperature: float = Field(0.07, gt=0, description="a neighbour's vote is exp(cosine similarity / temperature)")
    max_images: Optional[int] = Field(
        None, gt=0, description="at most this many images of each split: a fixed random subset, the same in every run"
    )
    crop_pct: float = Field(0.875, gt=0, le=1, description="resize to img_size / crop_pct, center crop")

    @model_validator(mode="after")
    def _labelled(self):
        if self.data.layout not in ("imagefolder", "inat", "places"):
            raise ValueError(f"the k-NN monitor needs labelled images (imagefolder, inat or places), not {self.data.layout}")
        return self


class TokenizerStage(StageBase):
    """BEiT's tokenizer trained by the pipeline before BEiT, as its own stage and MLflow run, on
    the pretraining images (BEiT's "customized" tokenizer): a Gumbel-softmax discrete VAE
    (``mixmae_core/tokenizer.py``) learning to reconstruct the view BEiT tokenizes (the crop at
    ``grid x 2**num_layers`` px). Its fields left out take the pretraining stage's data, image
    size, scaling and seed, and the encoder's tokenizer size (``mixmae_core/beit.py``)."""

    task: Literal["tokenizer"] = "tokenizer"
    vocab_size: int = Field(8192, ge=2, description="codes (8,192 at paper scale)")
    hidden: int = Field(256, ge=1, description="channels of the convolutions")
    codebook_dim: int = Field(512, ge=1)
    num_layers: int = Field(3, ge=1, description="stride-2 convolutions: the view is the patch grid x 2**num_layers px")
    kl_weight: float = Field(0.0, ge=0, description="weight of KL(code use || uniform) in the loss")
    anneal_fraction: float = Field(
        1.0, gt=0, le=1, description="share of the stage's steps over which the Gumbel temperature falls from 1 to 1/16"
    )
    min_code_fraction: float = Field(
        1 / 64, gt=0, lt=1, description="once annealed, the stage stops if it uses fewer distinct codes than this "
        "share of the book (at least 2)",
    )
    epochs: float = Field(50, gt=0)
    batch_size: int = Field(64, gt=0)
    base_lr: float = Field(4e-3, gt=0, description="lr = base_lr * batch_size / 256 (1e-3 at batch 64)")
    warmup_epochs: float = Field(1.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = Field(0.5, ge=0, le=1)
    eval_every_epochs: float = Field(5.0, gt=0, description="epochs between two measures of the codebook's use")

    def view(self, model: str) -> int:
        """The side of the view the tokenizer reads for BEiT encoder ``model``: its patch grid
        times the dVAE's downsampling (BEiT: 14 x 8 = 112 px for a 224-px crop)."""
        import timm
        import torch

        with torch.device("meta"):
            patch = timm.create_model(model).patch_embed.patch_size[0]
        return self.img_size // patch * 2**self.num_layers

    def architecture(self) -> dict[str, Any]:
        """The arguments of ``DiscreteVAE`` but its anneal (a number of steps, from the schedule)."""
        return dict(vocab_size=self.vocab_size, hidden=self.hidden, codebook_dim=self.codebook_dim,
                    num_layers=self.num_layers, kl_weight=self.kl_weight)


#: What a tokenizer stage takes from the pretraining stage it trains for, where it says nothing.
TOKENIZER_INHERITS = ("data", "img_size", "scaling", "seed", "fast", "log_every_steps", "crop_scale", "hflip")


class PretrainStage(StageBase):
    """The pretraining stage. ``method`` picks MixMAE, SimMIM, MAE or BEiT; the fields left out
    of a config take that method's recipe (``METHOD_RECIPES``: encoder, mask ratio, epochs, lr,
    warm-up, betas; BEiT's gradient clipping), the rest are the same for all (batch 2048,
    weight decay 0.05)."""

    task: Literal["pretrain"] = "pretrain"
    method: Literal["mixmae", "simmim", "mae", "beit"] = "mixmae"
    model: str
    mask_ratio: float = Field(description="share of the image the method hides (MixMAE: takes from the partner)")
    mask_mode: Literal["pair", "batch"] = Field(
        "pair", description="'pair': a mask per pair; 'batch': one per worker micro-batch, as the official code"
    )
    norm_pix_loss: bool = True
    epochs: float = Field(gt=0)
    batch_size: int = Field(2048, gt=0)
    base_lr: float = Field(gt=0)
    warmup_epochs: float = Field(ge=0)
    betas: tuple[float, float]
    reconstructions: int = Field(3, ge=0, description="reconstruction pictures logged over the run")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="RandomResizedCrop area range (the papers': 0.2-1)")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability (0 for images flips change)")
    monitor: Optional[Monitor] = Field(None, description="k-NN accuracy along the pretraining (eval/knn_top1)")
    eval_every_epochs: Optional[float] = Field(
        None, gt=0, description="epochs between two evaluations of the monitor (None: at the end only)"
    )
    tokenizer: Union[str, TokenizerStage, None] = Field(
        None, description="BEiT's: a file (`mixmae convert` of DALL-E's encoder, or a trained one), or the settings "
        "of one the pipeline trains first (the default)",
    )

    @model_validator(mode="before")
    @classmethod
    def _method_recipe(cls, data: Any) -> Any:
        if isinstance(data, dict):  # an unknown method gets MixMAE's, so only its own error shows
            data = {**METHOD_RECIPES.get(data.get("method", "mixmae"), METHOD_RECIPES["mixmae"]), **data}
            if data.get("method") == "beit" and not isinstance(data.get("tokenizer"), str):
                data["tokenizer"] = _tokenizer_settings(data)
        return data

    @field_validator("mask_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        from mixmae_core.masking import validate_mask_ratio

        return validate_mask_ratio(v)

    @model_validator(mode="after")
    def _pairs(self):
        if self.micro_batch() % 2:
            raise ValueError(
                f"each worker's micro-batch ({self.micro_batch()} = batch_size / (num_workers x accum_steps)) "
                "must be even: pretraining data comes in pairs (MixMAE mixes rows 2k and 2k+1)"
            )
        return self

    @model_validator(mode="after")
    def _tokenizer_is_beits(self):
        if self.tokenizer is not None and self.method != "beit":
            raise ValueError(f"tokenizer is BEiT's (its prediction targets); {self.method} takes none")
        if isinstance(self.tokenizer, str) and not Path(self.tokenizer).expanduser().is_file():
            raise ValueError(f"tokenizer file {self.tokenizer} does not exist (`mixmae convert` writes one from "
                             "DALL-E's encoder.pkl)")
        return self

    def method_options(self) -> dict[str, Any]:
        """The fields that are the method's own options besides the mask ratio and tokenizer
        (MixMAE: ``mask_mode``, ``norm_pix_loss``; MAE: ``norm_pix_loss``), for ``create_pretraining_model``."""
        from mixmae_core.methods import METHODS

        own = set(METHODS[self.method].options) - {"mask_ratio", "tokenizer"}
        return {k: getattr(self, k) for k in type(self).model_fields if k in own}

    def model_tokenizer(self, trained: Optional[str] = None) -> dict[str, Any]:
        """BEiT's ``tokenizer`` argument: the file the tokenizer stage wrote (``trained``), the
        configured file, or, for sizes and FLOPs before it is trained, the configured one untrained."""
        if self.method != "beit":
            return {}
        if trained is not None or isinstance(self.tokenizer, str):
            return {"tokenizer": str(Path(trained or self.tokenizer).expanduser().resolve())}
        from mixmae_core.tokenizer import build_tokenizer

        return {"tokenizer": build_tokenizer("dvae", **self.tokenizer.architecture())}

    @model_validator(mode="after")
    def _checkpointable(self):
        if self.grad_checkpointing and self.method in ("mae", "beit"):
            raise ValueError(
                f"grad_checkpointing: {self.method.upper() if self.method == 'mae' else 'BEiT'}'s pretraining model runs "
                f"its ViT's blocks itself ({self.method}.py), past the encoder's checkpointing switch; set it for mixmae "
                "or simmim pretraining, or for the transfer stages"
            )
        return self

    @model_validator(mode="after")
    def _buildable(self):
        """Build the pretraining model on the meta device (no memory, no time): a method that
        cannot drive the encoder, an encoder that refuses the image size, windows or key
        reductions, or a mask ratio the method's grid cannot draw, fails here with its own
        message, before any Ray process starts."""
        import torch

        from mixmae_core.methods import create_pretraining_model

        with torch.device("meta"):
            create_pretraining_model(self.method, self.model, img_size=self.img_size, mask_ratio=self.mask_ratio,
                                     **self.method_options(), **self.model_tokenizer(), **self.model_overrides)
        return self


def _tokenizer_settings(pretrain: dict[str, Any]) -> dict[str, Any]:
    """A BEiT stage's tokenizer settings, completed from the pretraining stage and, for the
    test-sized encoders, their small tokenizer's size."""
    from mixmae_core.beit import SMALL_TOKENIZERS

    own = dict(pretrain.get("tokenizer") or {})
    small = {k: v for k, v in SMALL_TOKENIZERS.get(pretrain.get("model"), {}).items() if k != "kind"}
    inherited = {k: pretrain[k] for k in TOKENIZER_INHERITS if k in pretrain}
    return {**inherited, **small, **own}


class TransferBase(StageBase):
    @model_validator(mode="after")
    def _replicated(self):
        if self.scaling.parallelism == "fsdp":
            raise ValueError(
                "scaling.parallelism: fsdp shards the pretraining stage's model; transfer stages train under ddp (their "
                "evaluations score unequal slices per worker; with grad_checkpointing they fit: see `mixmae plan`)"
            )
        return self

    init: str = Field("pretrained", description="'pretrained' (previous stage), 'random', or a checkpoint path")
    optimizer: Literal["adamw", "lars", "sgd"] = "adamw"
    layer_decay: Optional[float] = Field(None, gt=0, le=1)
    drop_path: float = Field(0.1, ge=0, lt=1)
    eval_every_epochs: float = Field(1.0, gt=0)


class ClassifyStage(TransferBase):
    task: Literal["classify"] = "classify"
    mode: Literal["finetune", "linear_probe"] = "finetune"
    epochs: float = Field(100, gt=0)
    batch_size: int = Field(1024, gt=0)
    base_lr: float = Field(5e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(5, ge=0)
    layer_decay: Optional[float] = Field(0.7, gt=0, le=1)
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    mixup: float = Field(0.8, ge=0)
    cutmix: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    reprob: float = Field(0.25, ge=0, le=1)
    crop_pct: float = Field(0.875, gt=0, le=1)
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range in training")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability in training")


class DetectStage(TransferBase):
    task: Literal["detect"] = "detect"
    img_size: int = Field(1024, gt=0)
    epochs: float = Field(36, gt=0)
    batch_size: int = Field(16, gt=0)
    base_lr: float = Field(1.6e-3, gt=0, description="1e-4 at batch 16, scaled by batch/256")
    warmup_epochs: float = Field(0.25, ge=0)
    layer_decay: Optional[float] = Field(0.9, gt=0, le=1)
    drop_path: float = Field(0.2, ge=0, lt=1)
    fpn_channels: int = Field(256, gt=0)
    head_channels: int = Field(256, gt=0, description="mask head width")
    box_head_dim: int = Field(1024, gt=0, description="box head MLP width")
    rois_per_image: int = Field(512, gt=0, description="RoIs sampled per image for the box/mask heads")
    proposals: int = Field(1000, gt=0, description="RPN proposals kept per image at test time (twice that in training)")
    detections_per_image: int = Field(100, gt=0)
    pictures: int = Field(4, ge=0, description="prediction pictures logged at the end")


class SegmentStage(TransferBase):
    task: Literal["segment"] = "segment"
    img_size: int = Field(512, gt=0)
    epochs: float = Field(127, gt=0, description="about 160k iterations at batch 16 on ADE20K")
    batch_size: int = Field(16, gt=0)
    base_lr: float = Field(1.6e-3, gt=0, description="1e-4 at batch 16, scaled by batch/256")
    warmup_epochs: float = Field(1.0, ge=0)
    layer_decay: Optional[float] = Field(0.9, gt=0, le=1)
    num_classes: int = Field(150, gt=1)
    decoder_channels: int = Field(512, gt=0)
    pictures: int = Field(4, ge=0, description="prediction pictures logged at the end")


TransferStage = Annotated[Union[ClassifyStage, DetectStage, SegmentStage], Field(discriminator="task")]
