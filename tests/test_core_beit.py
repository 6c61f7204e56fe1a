"""BEiT: its blockwise masks, its loss, its tokenizers (a trainable dVAE and DALL-E's encoder,
converted from the official pickle without running it), and where it is refused."""

from __future__ import annotations

import math
import os
import random
import sys
import types
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from mixmae_core.checkpoint import CheckpointError, load_encoder_weights
from mixmae_core.masking import MaskSpec, blockwise_mask, blockwise_sizes, draw_blocks
from mixmae_core.methods import create_pretraining_model
from mixmae_core.tokenizer import (
    CodebookCollapsed,
    DalleEncoder,
    DiscreteVAE,
    check_codebook,
    code_usage,
    convert_dalle_encoder,
    gumbel_temperature,
    load_tokenizer,
)
from pipelines.cli import app
from pipelines.config import DEFAULT_CONFIG, ConfigError, load_config

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# --- blockwise masking ----------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (16, 16), (10, 14)])
def test_blocks_keep_the_minimum_size_and_aspect_and_never_exceed_the_target(grid):
    target, min_block = blockwise_sizes(grid, 0.4)
    counts = []
    for seed in range(100):
        covered = torch.zeros(grid, dtype=torch.bool)
        for top, left, h, w in draw_blocks(grid, target, min_block, random.Random(seed)):
            assert h * w >= min_block and 0.3 <= h / w <= 1 / 0.3, (h, w)
            assert 0 <= top and top + h <= grid[0] and 0 <= left and left + w <= grid[1]
            covered[top : top + h, left : left + w] = True
        assert torch.equal(covered, blockwise_mask(grid, 0.4, random.Random(seed)))
        counts.append(int(covered.sum()))
    assert max(counts) <= target and sum(counts) / len(counts) >= 0.95 * target, (target, counts)


def test_block_sizes_scale_with_the_grids_area_from_beits_75_of_196():
    assert blockwise_sizes((14, 14), 75 / 196) == (75, 16)  # BEiT's own, at 224 px
    assert blockwise_sizes((8, 8), 75 / 196) == (24, 5)
    assert blockwise_sizes((28, 28), 75 / 196) == (300, 64)


def test_blockwise_masks_are_deterministic_per_seed():
    spec = MaskSpec((14, 14), 75 / 196, "blocks")
    assert torch.equal(spec.draw(11), spec.draw(11))
    assert not torch.equal(spec.draw(11), spec.draw(12))
    pair = spec.draw(11)
    assert not torch.equal(pair[0], pair[1])  # each image of a pair its own blocks


# --- BEiT's loss and what its encoder sees --------------------------------------------------


def _beit():
    torch.manual_seed(0)
    return create_pretraining_model("beit", "beit_micro_p8", img_size=64).eval()  # eval: no drop path


def test_beit_loss_is_cross_entropy_against_the_tokenizers_codes_at_masked_patches():
    model = _beit()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    masks = model.mask_spec.draw_rows([0, 1])
    with torch.no_grad():
        out = model(images, masks)
        # the tokenizer's view: ImageNet normalisation undone, 16 px (a grid of 8 at its 2x
        # downsampling), DALL-E's pixel map
        small = F.interpolate(images * IMAGENET_STD + IMAGENET_MEAN, size=(16, 16), mode="bicubic", antialias=True)
        codes = model.tokenizer.encoder(small.clamp(0, 1) * 0.8 + 0.1).argmax(dim=1).flatten(1)
        logits = model.lm_head(model.forward_encoder(images, masks))
    hidden = masks.flatten(1)
    expected_logits, expected_codes = logits[hidden], codes[hidden]
    log_p = expected_logits.log_softmax(dim=-1)
    expected = -log_p[torch.arange(len(expected_codes)), expected_codes].mean()
    assert out.pred.shape == (int(hidden.sum()), 512) and torch.allclose(out.pred, expected_logits, atol=1e-5)
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    accuracy = (expected_logits.argmax(-1) == expected_codes).float().mean()
    assert torch.equal(out.metrics["masked_token_acc"], accuracy)


def test_the_encoder_never_sees_a_masked_patchs_pixels():
    model = _beit()
    images = torch.randn(4, 3, 64, 64)
    masks = model.mask_spec.draw_rows([2, 3])
    pixels = masks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    changed = torch.where(pixels, torch.randn_like(images), images)
    with torch.no_grad():
        assert torch.allclose(model.forward_encoder(images, masks), model.forward_encoder(changed, masks), atol=1e-5)
        assert not torch.allclose(model.targets(images), model.targets(changed))  # the targets do see them


def test_a_classifier_of_the_same_name_loads_the_pretrained_encoder():
    """BEiT pretrains one relative-position table for all blocks; the classifier (timm's
    layout, a table per block, mean pooling) gets a copy in every block, as BEiT's fine-tuning."""
    model = _beit()
    with torch.no_grad():
        model.encoder.rel_pos_bias.relative_position_bias_table.normal_()
    shared = model.encoder.rel_pos_bias.relative_position_bias_table
    classifier = timm.create_model("beit_micro_p8", num_classes=5)
    load_encoder_weights(classifier, model.encoder.state_dict())
    assert all(torch.equal(block.attn.relative_position_bias_table, shared) for block in classifier.blocks)
    assert torch.equal(classifier.patch_embed.proj.weight, model.encoder.patch_embed.proj.weight)
    assert classifier(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_beits_panels_decode_its_predictions_with_the_dvae():
    model = _beit()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        panels = model.panels(images, model(images, model.mask_spec.draw_rows([0, 1])))
    assert panels.shape == (4, 3, 3, 64, 64) and torch.isfinite(panels).all()


def test_beit_on_a_hierarchical_encoder_is_refused_at_config_load(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain: BEiT pretrains a timm BEiT \(beit_base_patch16_224 in its paper, "
                       r"beit_micro_p8 for tests\).*got 'mixmae_swin_micro_w8' \(a hierarchical encoder: pretrain it "
                       r"with mixmae or simmim\)"):
        load_config(DEFAULT_CONFIG, ["pretrain.method=beit"])
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["stages"] = {"inat2018": config["stages"]["inat2018"]}
    config.pop("stage_groups")
    config["pretrain"].update(method="beit", model="beit_micro_p8", base_lr=None)
    del config["pretrain"]["base_lr"]
    path = tmp_path / "beit.yaml"
    path.write_text(yaml.safe_dump(config))
    pretrain = load_config(path).pretrain
    assert (pretrain.clip_grad, pretrain.betas, pretrain.base_lr) == (3.0, (0.9, 0.999), pytest.approx(1.875e-4))
    assert pretrain.mask_ratio == pytest.approx(75 / 196) and pretrain.method_options() == {}


# --- the dVAE tokenizer ---------------------------------------------------------------------


def test_a_collapsed_codebook_is_refused_with_what_to_try():
    collapsed = torch.zeros(512, dtype=torch.long)
    collapsed[:7] = 10
    with pytest.raises(CodebookCollapsed, match=r"7 of 512 codes used over 70 tokens \(at least 8 expected.*Try a lower"):
        check_codebook(collapsed)
    check_codebook(code_usage(torch.randint(0, 512, (64, 14, 14), generator=torch.Generator().manual_seed(0)), 512))
    skewed = torch.zeros(512, dtype=torch.long)  # the background in most tokens, yet codes enough for the rest
    skewed[0], skewed[1:9] = 10_000, 1
    check_codebook(skewed)


def test_the_gumbel_temperature_anneals_from_one_to_its_floor():
    assert gumbel_temperature(0) == 1.0
    assert gumbel_temperature(75_000) == pytest.approx(0.25)  # halfway in log scale
    assert gumbel_temperature(150_000) == pytest.approx(1 / 16) and gumbel_temperature(10**7) == 1 / 16


def test_a_few_dvae_steps_lower_its_reconstruction_error():
    torch.manual_seed(0)
    dvae = DiscreteVAE(vocab_size=64, hidden=16, codebook_dim=16, num_layers=2, anneal_steps=100)
    ramp = torch.linspace(-1.5, 1.5, 32)
    images = torch.stack([ramp.view(1, -1).expand(32, 32), ramp.view(-1, 1).expand(32, 32), -ramp.view(1, -1).expand(32, 32)])
    images = torch.stack([images, images.flip(-1), images.flip(-2), images.transpose(-1, -2)])
    opt = torch.optim.Adam(dvae.parameters(), lr=1e-2)
    errors = []
    for step in range(12):
        out = dvae(images, step)
        errors.append(out.metrics["recon_mse"].item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert errors[-1] < 0.5 * errors[0], errors
    assert set(out.metrics) == {"recon_mse", "kl", "codes_used", "perplexity", "temperature"}
    assert dvae.codes(torch.rand(2, 3, 32, 32)).shape == (2, 8, 8)


# --- DALL-E's encoder, from a pickle written by the official conventions ---------------------


def _official_dall_e() -> dict[str, types.ModuleType]:
    """Modules ``dall_e``, ``dall_e.encoder`` and ``dall_e.utils`` whose classes mirror the
    official ones (names, attributes, ``__module__``, forward), so ``torch.save`` of an
    ``Encoder`` writes what ``encoder.pkl`` holds."""
    utils, encoder = types.ModuleType("dall_e.utils"), types.ModuleType("dall_e.encoder")

    class Conv2d(nn.Module):
        def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device("cpu"), requires_grad=False):
            super().__init__()
            self.n_in, self.n_out, self.kw = n_in, n_out, kw
            self.use_float16, self.device, self.requires_grad = use_float16, device, requires_grad
            w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32).normal_(std=1 / (n_in * kw**2) ** 0.5)
            self.w, self.b = nn.Parameter(w), nn.Parameter(torch.zeros((n_out,), dtype=torch.float32))

        def forward(self, x):
            return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)

    class EncoderBlock(nn.Module):
        def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
            super().__init__()
            self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
            self.device, self.requires_grad = device, requires_grad
            self.n_hid = n_out // 4
            self.post_gain = 1 / (n_layers**2)
            self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
            h = self.n_hid
            self.res_path = nn.Sequential(OrderedDict([
                ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, h, 3)), ("relu_2", nn.ReLU()), ("conv_2", Conv2d(h, h, 3)),
                ("relu_3", nn.ReLU()), ("conv_3", Conv2d(h, h, 3)), ("relu_4", nn.ReLU()), ("conv_4", Conv2d(h, n_out, 1)),
            ]))  # fmt: skip

        def forward(self, x):
            return self.id_path(x) + self.post_gain * self.res_path(x)

    class Encoder(nn.Module):
        group_count = 4

        def __init__(self, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192,
                     device=torch.device("cpu"), requires_grad=False, use_mixed_precision=True):
            super().__init__()
            self.n_hid, self.n_blk_per_group, self.input_channels, self.vocab_size = (
                n_hid, n_blk_per_group, input_channels, vocab_size)
            self.device, self.requires_grad, self.use_mixed_precision = device, requires_grad, use_mixed_precision
            n_layers = self.group_count * n_blk_per_group

            def group(n_in, width, pool):
                blocks = [(f"block_{i + 1}", EncoderBlock(n_in if i == 0 else width, width, n_layers))
                          for i in range(n_blk_per_group)]
                return nn.Sequential(OrderedDict(blocks + ([("pool", nn.MaxPool2d(kernel_size=2))] if pool else [])))

            self.blocks = nn.Sequential(OrderedDict([
                ("input", Conv2d(input_channels, n_hid, 7)),
                ("group_1", group(n_hid, n_hid, True)), ("group_2", group(n_hid, 2 * n_hid, True)),
                ("group_3", group(2 * n_hid, 4 * n_hid, True)), ("group_4", group(4 * n_hid, 8 * n_hid, False)),
                ("output", nn.Sequential(OrderedDict([
                    ("relu", nn.ReLU()), ("conv", Conv2d(8 * n_hid, vocab_size, 1, use_float16=False))]))),
            ]))  # fmt: skip

        def forward(self, x):
            return self.blocks(x)

    for module, classes in ((utils, [Conv2d]), (encoder, [EncoderBlock, Encoder])):
        for cls in classes:
            cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
            setattr(module, cls.__name__, cls)
    package = types.ModuleType("dall_e")
    package.encoder, package.utils = encoder, utils
    return {"dall_e": package, "dall_e.encoder": encoder, "dall_e.utils": utils}


def _write_official(path, monkeypatch, **kwargs) -> nn.Module:
    """Save an official-style ``Encoder`` as ``encoder.pkl`` is saved (the module pickled);
    afterwards no ``dall_e`` module is importable."""
    with monkeypatch.context() as patch:
        modules = _official_dall_e()
        for name, module in modules.items():
            patch.setitem(sys.modules, name, module)
        extra = kwargs.pop("extra", None)
        torch.manual_seed(0)
        official = modules["dall_e.encoder"].Encoder(**kwargs)
        if extra is not None:  # a payload the official file does not hold
            official.extra = extra
        torch.save(official, path)
    assert "dall_e" not in sys.modules
    return official


def test_dall_e_encoder_pkl_converts_without_its_code_and_gives_the_same_codes(tmp_path, monkeypatch):
    src = tmp_path / "encoder.pkl"
    official = _write_official(src, monkeypatch, n_hid=64, n_blk_per_group=1, vocab_size=512)
    state = convert_dalle_encoder(src)
    assert "dall_e" not in sys.modules  # nothing was imported to read it
    ours = DalleEncoder(**DalleEncoder.config_of(state))
    ours.load_state_dict(state)
    pixels = torch.rand(3, 3, 32, 32) * 0.8 + 0.1
    with torch.no_grad():
        assert torch.allclose(ours(pixels), official(pixels), atol=1e-5)
        assert torch.equal(ours.codes(pixels), official(pixels).argmax(dim=1))

    dst = tmp_path / "dalle.safetensors"
    result = CliRunner().invoke(app, ["convert", str(src), str(dst)])
    assert result.exit_code == 0 and "512 codes" in result.output, result.output
    tokenizer = load_tokenizer(dst)
    assert isinstance(tokenizer, DalleEncoder) and torch.equal(tokenizer.codes(pixels), ours.codes(pixels))
    beit = create_pretraining_model("beit", "beit_micro_p8", img_size=64, tokenizer=dst)
    assert beit.tokenizer_size == (64, 64) and beit.lm_head.out_features == 512  # downsampling 8, a grid of 8


def test_a_pickle_naming_any_other_global_is_refused_unrun(tmp_path, monkeypatch):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    src = tmp_path / "encoder.pkl"
    _write_official(src, monkeypatch, n_hid=64, n_blk_per_group=1, vocab_size=512, extra=Payload())
    with pytest.raises(CheckpointError, match=r"refused, not unpickled: it names posix.system, which DALL-E's encoder.pkl does not"):
        convert_dalle_encoder(src)
    result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2 and "refused, not unpickled" in result.output
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_dall_e_at_paper_scale_has_its_size():
    with torch.device("meta"):
        encoder = DalleEncoder()
    assert sum(p.numel() for p in encoder.parameters()) / 1e6 == pytest.approx(53.8, abs=0.1)
    assert math.prod(encoder(torch.zeros(1, 3, 112, 112, device="meta")).shape[-2:]) == 196
