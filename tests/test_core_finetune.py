"""Fine-tuning as the official code does it: layer-wise lr decay, weight decay groups, head
initialisation, position tables at 384 px; and the checkpoint files users have."""

from __future__ import annotations

import argparse
import decimal
import math

import pytest
import timm
import torch
from typer.testing import CliRunner

import mixmae_core
from mixmae_core.checkpoint import convert_official, load_state_dict, save_state_dict
from mixmae_core.layers import interpolate_table, sincos_2d
from mixmae_core.optim import build_optimizer
from mixmae_core.tasks.classification import build_classifier
from pipelines.cli import app
from tests.official_reference import OfficialMixMIM

MICRO = "mixmae_swin_micro_w8"
SWIN_B_DEPTHS = (2, 2, 18, 2)


def official_layer_id(name: str, depths=SWIN_B_DEPTHS) -> int:
    """Written from the official ``get_layer_id_for_mixmim`` (util/lr_decay.py), for the
    official names: a stage's merge sits at its end there, at the next stage's start here."""
    parts = name.split(".")
    if name.startswith(("patch_embed", "absolute_pos_embed")):
        return 0
    if name.startswith("layers"):
        stage = int(parts[1])
        if parts[2] == "downsample":  # ours: layers.{s}.downsample == official layers.{s-1}.downsample
            return sum(depths[:stage]) + 1
        return sum(depths[:stage]) + int(parts[3]) + 1
    return sum(depths)  # the final norm and the head


def test_every_swin_b_parameter_gets_the_official_lr_scale_and_weight_decay():
    with torch.device("meta"):
        model = timm.create_model("mixmae_swin_base_w14", num_classes=1000)
    optimizer = build_optimizer(model, 1e-3, weight_decay=0.05, layer_decay=0.7)
    total_layers = sum(SWIN_B_DEPTHS) + 1
    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            assert group["lr_scale"] == pytest.approx(0.7 ** (total_layers - official_layer_id(name)), rel=1e-9), name
            # fine-tuning exempts the 1-D parameters only: relative-position tables decay
            assert group["weight_decay"] == (0.0 if param.ndim == 1 else 0.05), name
            seen += 1
    assert seen == len(names)
    head = next(g for g in optimizer.param_groups for p in g["params"] if names[id(p)] == "head.weight")
    assert head["lr_scale"] == pytest.approx(0.7)  # with the final norm, not a layer of its own


def test_pretraining_decays_everything_but_1d_parameters_and_biases():
    model = mixmae_core.create_model(MICRO)
    optimizer = build_optimizer(model, 1e-3, weight_decay=0.05)
    decay = {n for g in optimizer.param_groups if g["weight_decay"] for n, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    for name, param in model.named_parameters():
        assert (name in decay) == (param.ndim > 1 and not name.endswith(".bias")), name
    assert "decoder.mask_token" in decay and any(n.endswith("relative_position_bias_table") for n in decay)


def test_a_head_on_pretrained_weights_starts_near_zero(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "encoder.safetensors"
    save_state_dict(path, mixmae_core.create_model(MICRO).encoder.state_dict())
    pretrained = build_classifier(MICRO, 10, img_size=64, encoder_weights=str(path))
    scratch = build_classifier(MICRO, 10, img_size=64)
    assert pretrained.head.weight.std() < 5e-5 < scratch.head.weight.std()


def _official(img_size: int = 128, window_size=(8, 8, 8, 8)):
    torch.manual_seed(0)
    cfg = dict(img_size=img_size, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=window_size)
    model = OfficialMixMIM(**cfg, dec_dim=64, dec_depth=2, dec_heads=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model, cfg


def test_a_training_checkpoint_of_main_pretrain_converts_and_computes_the_same_loss(tmp_path):
    official, cfg = _official()
    optimizer = torch.optim.AdamW((p for p in official.parameters() if p.requires_grad), lr=1e-3)
    src = tmp_path / "checkpoint-599.pth"
    torch.save({"model": official.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 599,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 10},
                "args": argparse.Namespace(model="mixmim_base", batch_size=128, mask_ratio=0.5, lr=None)}, src)
    dst = tmp_path / "converted.safetensors"
    result = CliRunner().invoke(app, ["convert", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    ours = mixmae_core.create_model(MICRO, **cfg, decoder_dim=64, decoder_depth=2, decoder_num_heads=4).eval()
    ours.load_state_dict(load_state_dict(dst), strict=True)
    images, mask = torch.randn(6, 3, 128, 128), (torch.rand(4, 4) < 0.5).float()
    with torch.no_grad():
        expected = official(images, mask)
        order = [i for k in range(3) for i in (k, 5 - k)]  # the official pairs image i with B-1-i
        got = ours(images[order], mask.bool().expand(6, 4, 4)).loss
    assert torch.allclose(got, expected, rtol=1e-5, atol=0), (got.item(), expected.item())


def test_a_384_fine_tuned_checkpoint_keeps_its_interpolated_table(tmp_path):
    """The official 384-px fine-tuning interpolates the 224-px table (56x56 -> 96x96, bicubic)."""
    official, _ = _official(384, window_size=(8, 8, 8, 12))
    state = {k: v for k, v in official.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    table = sincos_2d((56, 56), 32)[None].permute(0, 3, 1, 2)  # written as main_finetune's interpolate_pos_embed
    interpolated = torch.nn.functional.interpolate(table, size=(96, 96), mode="bicubic", align_corners=False)
    state["absolute_pos_embed"] = interpolated.permute(0, 2, 3, 1).flatten(1, 2)
    state["head.weight"], state["head.bias"] = torch.randn(10, 256), torch.zeros(10)
    converted = convert_official(state)
    assert torch.allclose(converted["absolute_pos_embed"], interpolated[0].permute(1, 2, 0))
    model = timm.create_model(MICRO, img_size=384, window_size=(8, 8, 8, 12), num_classes=10)
    model.load_state_dict(converted, strict=True)
    assert not torch.allclose(model.absolute_pos_embed, sincos_2d((96, 96), 32), atol=1e-3)  # not a fresh table
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 10)


def test_fine_tuning_at_384_from_a_224_encoder_interpolates_its_table(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "encoder.safetensors"
    save_state_dict(path, mixmae_core.create_model(MICRO, img_size=224, window_size=(8, 7, 7, 7)).encoder.state_dict())
    model = build_classifier(MICRO, 10, img_size=384, window_size=(8, 8, 8, 12), encoder_weights=str(path))
    assert torch.allclose(model.absolute_pos_embed, interpolate_table(sincos_2d((56, 56), 32), (96, 96)))


@pytest.mark.parametrize(
    "content,found",
    [
        (b"not a checkpoint at all", "found unreadable bytes"),
        ("foreign_object", "found an object of type decimal.Decimal"),
        ("tensor_list", "found list"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_refused_in_one_line(tmp_path, content, found):
    src = tmp_path / "bad.pth"
    if content == "foreign_object":
        torch.save({"model": {}, "args": decimal.Decimal("1.5")}, src)
    elif content == "tensor_list":
        torch.save([torch.zeros(1)], src)
    else:
        src.write_bytes(content)
    result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert found in result.output and "expected" in result.output
    assert len(result.output.strip().splitlines()) <= 2  # one message (the console may wrap it)


def test_a_foreign_position_table_is_refused():
    state = {"absolute_pos_embed": torch.randn(1, 16, 32), "decoder_pred.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="expected the fixed 2-D sin-cos position table"):
        convert_official(state)


@pytest.mark.parametrize("name,final_norm", [("vit_base_patch16_224", "norm.weight"), ("beit_base_patch16_224", "fc_norm.weight")])
def test_layer_scales_of_a_vit_follow_mae_and_beit(name, final_norm):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=10)
    optimizer = build_optimizer(model, 1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = {n: g["lr_scale"] for g in optimizer.param_groups for n, p in model.named_parameters()
              if any(p is q for q in g["params"])}
    assert math.isclose(scales["head.weight"], 1.0) and math.isclose(scales[final_norm], 1.0)
    assert math.isclose(scales["blocks.11.mlp.fc2.weight"], 0.75)
    assert math.isclose(scales["patch_embed.proj.weight"], 0.75**13)
