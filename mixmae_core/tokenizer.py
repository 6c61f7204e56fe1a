"""BEiT's tokenizers: what turns an image into the visual tokens BEiT learns to predict.

Two, with one interface (``vocab_size``, ``downsample``, ``codes(pixels) -> (B, h, w)``):

* ``DiscreteVAE``: a Gumbel-softmax discrete VAE a pipeline stage can train on its own data
  (BEiT's ``--discrete_vae_type customized``): stride-2 convolutions down to the token grid,
  a codebook, transposed convolutions back to pixels.
* ``DalleEncoder``: DALL-E's encoder (openai/DALL-E ``dall_e/encoder.py``), the tokenizer of
  BEiT's paper, re-stated with the official parameter names so ``convert_dalle_encoder``'s
  output of the official ``encoder.pkl`` loads into it.

Both read pixels as DALL-E does: ``[0, 1]`` mapped to ``[0.1, 0.9]`` (``tokenizer_input``).
Tokenizer weights travel as safetensors whose metadata names the kind and its arguments
(``save_tokenizer`` / ``load_tokenizer``), so loading one unpickles nothing.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mixmae_core.checkpoint import (
    CheckpointError, PathLike, StateDict, checkpoint_info, load_state_dict, refused_global, save_state_dict,
)

DALLE_EPS = 0.1
"""DALL-E's ``logit_laplace_eps``: pixels in ``[0, 1]`` are mapped to ``[eps, 1 - eps]``."""


def tokenizer_input(images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Images normalised with the ImageNet mean and std (as the data pipeline delivers them) ->
    a tokenizer's pixels at ``size`` (default: as they are), mapped as DALL-E's ``map_pixels``.

    The smaller view is resized on the device, bicubic with antialiasing: BEiT draws it with
    Lanczos (``second_interpolation``), which torch does not offer; antialiased bicubic is the
    nearest windowed filter it has, and without antialiasing a 2x reduction aliases.
    """
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    pixels = images.float() * std + mean
    if size is not None and tuple(pixels.shape[-2:]) != tuple(size):
        pixels = F.interpolate(pixels, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return pixels.clamp(0, 1) * (1 - 2 * DALLE_EPS) + DALLE_EPS


def images_from_tokenizer(pixels: torch.Tensor) -> torch.Tensor:
    """The inverse of ``tokenizer_input`` (at the tokenizer's size): DALL-E's ``unmap_pixels``,
    then the ImageNet normalisation, for pictures."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=pixels.device).view(1, 3, 1, 1)
    return (((pixels.float() - DALLE_EPS) / (1 - 2 * DALLE_EPS)).clamp(0, 1) - mean) / std


# --- the trainable tokenizer: a Gumbel-softmax discrete VAE ---------------------------------


def gumbel_temperature(step: int, start: float = 1.0, floor: float = 1 / 16, anneal_steps: int = 150_000) -> float:
    """The Gumbel-softmax temperature at ``step``: lucidrains' exponential anneal
    (DALLE-pytorch's ``train_vae.py``: ``max(floor, start * exp(-rate * step))``) with DALL-E's
    end points, 1 down to 1/16 over its first 150,000 updates (``rate`` is set so the floor is
    reached at ``anneal_steps``)."""
    rate = math.log(start / floor) / anneal_steps
    return max(floor, start * math.exp(-rate * step))


@dataclass
class TokenizerOutput:
    loss: torch.Tensor
    """Scalar: reconstruction MSE (+ ``kl_weight`` x KL to uniform code use)."""
    recon: torch.Tensor
    """``(B, 3, H, W)`` reconstructed tokenizer pixels (DALL-E's mapping)."""
    metrics: dict[str, torch.Tensor]
    """``recon_mse``, ``kl``, ``codes_used`` and ``perplexity`` (of the batch's argmax codes), ``temperature``."""


class CodebookCollapsed(RuntimeError):
    """A tokenizer whose codes collapsed to a few; the message says how many and what to try."""


def code_usage(codes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each code appears in ``codes`` (any shape): ``(vocab_size,)`` counts."""
    return torch.bincount(codes.flatten(), minlength=vocab_size)


def usage_perplexity(usage: torch.Tensor) -> torch.Tensor:
    """``exp`` of the entropy of code use: how many codes, used equally, the usage is worth."""
    p = usage.float() / usage.sum().clamp(min=1)
    return torch.exp(-(p * p.clamp(min=1e-12).log()).sum())


def check_codebook(usage: torch.Tensor, min_fraction: float = 1 / 64) -> None:
    """Raise ``CodebookCollapsed`` if the code use ``usage`` (``code_usage`` counts, summed over
    enough tokens to tell, e.g. an epoch's) holds fewer distinct codes than ``min_fraction`` of
    the codebook (at least 2): BEiT's targets would carry almost no information. Distinct codes,
    not the perplexity: images whose background fills most tokens skew the use of a healthy book."""
    vocab = usage.numel()
    used = int((usage > 0).sum())
    needed = max(2, math.ceil(min_fraction * vocab))
    if used < needed:
        raise CodebookCollapsed(
            f"the tokenizer's codebook collapsed: {used} of {vocab} codes used over {int(usage.sum())} tokens "
            f"(at least {needed} expected; perplexity {usage_perplexity(usage).item():.1f}). Try a lower learning "
            "rate, a slower temperature anneal, a KL weight > 0 (pulls code use towards uniform), a smaller "
            "codebook, or longer training"
        )


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class DiscreteVAE(nn.Module):
    """BEiT's customized tokenizer (its ``modeling_discrete_vae.DiscreteVAE``, from lucidrains'
    DALLE-pytorch): ``num_layers`` stride-2 convolutions, each followed by a residual block,
    then logits over ``vocab_size`` codes; the decoder mirrors it from the codebook vectors.

    ``num_layers=3`` downsamples 8x as DALL-E (8,192 codes at paper scale); the defaults are a
    512-code book for small data. Training: ``forward(images, step)``; targets: ``codes``.
    """

    kind = "dvae"

    def __init__(
        self,
        vocab_size: int = 512,
        hidden: int = 64,
        codebook_dim: int = 512,
        num_layers: int = 3,
        kl_weight: float = 0.0,
        anneal_steps: int = 150_000,
    ):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, hidden=hidden, codebook_dim=codebook_dim, num_layers=num_layers,
                           kl_weight=kl_weight, anneal_steps=anneal_steps)
        self.vocab_size, self.kl_weight, self.anneal_steps = vocab_size, kl_weight, anneal_steps
        self.downsample = 2**num_layers
        down, up = [], []
        for i in range(num_layers):
            down += [nn.Conv2d(3 if i == 0 else hidden, hidden, 4, stride=2, padding=1), nn.ReLU(), ResBlock(hidden)]
            up += [nn.ConvTranspose2d(codebook_dim if i == 0 else hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),
                   ResBlock(hidden)]
        self.encoder = nn.Sequential(*down, nn.Conv2d(hidden, vocab_size, 1))
        self.codebook = nn.Embedding(vocab_size, codebook_dim)
        self.decoder = nn.Sequential(*up, nn.Conv2d(hidden, 3, 1))

    @torch.no_grad()
    def codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` tokenizer pixels -> ``(B, H/d, W/d)`` code indices (the argmax)."""
        return self.encoder(pixels).argmax(dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` codes -> tokenizer pixels ``(B, 3, h*d, w*d)``."""
        return self.decoder(self.codebook(codes).permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor, step: int) -> TokenizerOutput:
        """One training step's loss on ``images`` as the data pipeline delivers them (ImageNet-
        normalised; sides a multiple of ``downsample``), at the Gumbel temperature of ``step``."""
        pixels = tokenizer_input(images)
        logits = self.encoder(pixels)  # (B, K, h, w)
        temperature = gumbel_temperature(step, anneal_steps=self.anneal_steps)
        soft = F.gumbel_softmax(logits, tau=temperature, dim=1)
        recon = self.decoder(torch.einsum("bkhw,kd->bdhw", soft, self.codebook.weight))
        recon_mse = F.mse_loss(recon, pixels)
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.vocab_size))).sum(dim=1).mean()  # KL(q || uniform) per token
        usage = code_usage(logits.argmax(dim=1), self.vocab_size)
        metrics = dict(recon_mse=recon_mse.detach(), kl=kl.detach(), codes_used=(usage > 0).sum(),
                       perplexity=usage_perplexity(usage), temperature=torch.tensor(temperature))
        return TokenizerOutput(loss=recon_mse + self.kl_weight * kl, recon=recon, metrics=metrics)


# --- DALL-E's encoder, with its parameter names ---------------------------------------------


class DalleConv2d(nn.Module):
    """DALL-E's ``utils.Conv2d``: parameters ``w`` and ``b``, 'same' padding, its initialisation.
    (The official runs it in fp16 on CUDA; here it computes in the input's dtype.)"""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=1 / math.sqrt(n_in * kw**2)))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class DalleEncoderBlock(nn.Module):
    """An identity path (a 1x1 convolution where the width changes) plus a bottleneck residual
    path (4x narrower) scaled by ``1 / n_layers**2``."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = DalleConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", DalleConv2d(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", DalleConv2d(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", DalleConv2d(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", DalleConv2d(n_hid, n_out, 1)),
        ]))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """DALL-E's ``Encoder``: a 7x7 input convolution, four groups of ``n_blk_per_group`` blocks
    at widths 1, 2, 4, 8 x ``n_hid`` with a 2x max-pool after each of the first three
    (downsampling 8), then logits over ``vocab_size`` codes."""

    kind = "dalle"
    downsample = 8

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3, vocab_size: int = 8192):
        super().__init__()
        self.config = dict(n_hid=n_hid, n_blk_per_group=n_blk_per_group, input_channels=input_channels,
                           vocab_size=vocab_size)
        self.vocab_size = vocab_size
        n_layers = 4 * n_blk_per_group
        groups, n_in = [], n_hid
        for g, width in enumerate((n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid), start=1):
            group = [(f"block_{i + 1}", DalleEncoderBlock(n_in if i == 0 else width, width, n_layers))
                     for i in range(n_blk_per_group)]
            if g < 4:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
            n_in = width
        output = nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", DalleConv2d(8 * n_hid, vocab_size, 1))]))
        self.blocks = nn.Sequential(OrderedDict([("input", DalleConv2d(input_channels, n_hid, 7)), *groups,
                                                 ("output", output)]))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` pixels (DALL-E's mapping) -> logits ``(B, vocab_size, H/8, W/8)``."""
        return self.blocks(pixels)

    @torch.no_grad()
    def codes(self, pixels: torch.Tensor) -> torch.Tensor:
        return self(pixels).argmax(dim=1)

    @classmethod
    def config_of(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """The arguments that built ``state_dict``, read from its shapes."""
        stem = state_dict["blocks.input.w"]
        blocks = {k.split(".")[2] for k in state_dict if k.startswith("blocks.group_1.block_")}
        return dict(n_hid=stem.shape[0], n_blk_per_group=len(blocks), input_channels=stem.shape[1],
                    vocab_size=state_dict["blocks.output.conv.w"].shape[0])


TOKENIZERS: dict[str, type[nn.Module]] = {DiscreteVAE.kind: DiscreteVAE, DalleEncoder.kind: DalleEncoder}


def build_tokenizer(kind: str, **config: Any) -> nn.Module:
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {kind!r}; choose one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[kind](**config)


def save_tokenizer(path: PathLike, tokenizer: nn.Module, source: str = "") -> None:
    """Weights as safetensors, with the kind and arguments that rebuild the tokenizer."""
    meta = {"tokenizer": tokenizer.kind, "config": json.dumps(tokenizer.config), "source": source}
    save_state_dict(path, tokenizer.state_dict(), meta)


def load_tokenizer(path: PathLike) -> nn.Module:
    """A tokenizer written by ``save_tokenizer`` (or ``mixmae convert`` of DALL-E's encoder)."""
    info = checkpoint_info(path)
    if "tokenizer" not in info:
        raise CheckpointError(f"{path}: expected a tokenizer written by save_tokenizer or `mixmae convert`, "
                              f"found a file without one in its metadata ({sorted(info)})")
    tokenizer = build_tokenizer(info["tokenizer"], **json.loads(info["config"]))
    tokenizer.load_state_dict(load_state_dict(path))
    return tokenizer


# --- converting the official encoder.pkl without running its code ---------------------------


class _Pickled:
    """Stands in for a class DALL-E's pickle names: keeps the state it is given, runs nothing.
    ``pickled_name`` is the name the pickle used."""

    pickled_name = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


#: Every global the official ``encoder.pkl`` (a pickled ``dall_e.encoder.Encoder``) names
#: beyond what ``torch.load(weights_only=True)`` allows anyway (tensors, parameters,
#: ``OrderedDict``, ``torch.device``, ``set``)
DALLE_CLASSES = (
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock", "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.linear.Identity",
)


def _stand_ins() -> list[tuple[type, str]]:
    return [(type(name.rsplit(".", 1)[1], (_Pickled,), {"pickled_name": name}), name) for name in DALLE_CLASSES]


def _parameters(module: _Pickled, prefix: str, out: StateDict) -> None:
    state = module.state if isinstance(getattr(module, "state", None), dict) else {}
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value.detach().clone()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, _Pickled):
            _parameters(child, f"{prefix}{name}.", out)


def pickled_globals(path: PathLike) -> set[str]:
    """The globals a torch file's pickle names (``module.name``, as ``torch.save`` writes them:
    protocol 2), read without unpickling it."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            data = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            return _globals(io.BytesIO(archive.read(data) if data else b""))
    with open(path, "rb") as f:
        return _globals(f)


def _globals(stream: BinaryIO) -> set[str]:
    names: set[str] = set()
    for _ in range(4):  # the legacy format holds a few pickles in a row, the object in the fourth
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    names.add(arg.replace(" ", "."))
        except ValueError:  # the tensors' bytes after the last pickle, or no pickle at all
            break
    return names


def is_dalle_pickle(path: PathLike) -> bool:
    return "dall_e.encoder.Encoder" in pickled_globals(path)


def convert_dalle_encoder(src: PathLike) -> StateDict:
    """The official ``encoder.pkl`` (a pickled ``dall_e.encoder.Encoder``) -> a state dict that
    ``DalleEncoder`` loads.

    Read with ``torch.load(weights_only=True)``; the classes the pickle names are mapped to
    inert stand-ins that only collect state, so no code from the file runs. A pickle that
    names any other global is refused, unread.
    """
    try:
        with torch.serialization.safe_globals(_stand_ins()):
            root = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = refused_global(exc) or "an object it cannot rebuild"
        raise CheckpointError(
            f"{src}: refused, not unpickled: it names {named}, which DALL-E's encoder.pkl does not; only "
            f"{', '.join(DALLE_CLASSES)} and tensors are read"
        ) from None
    if getattr(root, "pickled_name", None) != "dall_e.encoder.Encoder":
        found = getattr(root, "pickled_name", type(root).__name__)
        raise CheckpointError(f"{src}: expected a pickled dall_e.encoder.Encoder, found {found}")
    state_dict: StateDict = {}
    _parameters(root, "", state_dict)
    try:
        with torch.device("meta"):  # the layout is checked, no memory is spent
            DalleEncoder(**DalleEncoder.config_of(state_dict)).load_state_dict(state_dict, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{src}: a dall_e.encoder.Encoder whose weights do not fit DALL-E's layout ({exc})"
        ) from None
    return state_dict
