"""Every hierarchical encoder keeps MixMAE's isolation; SimMIM and MAE do what their papers say;
every method is built, fed and stepped the same way; FLOPs count each method as it runs."""

from __future__ import annotations

import pytest
import timm
import torch

import mixmae_core
from mixmae_core import mae, simmim
from mixmae_core.encoders import convs
from mixmae_core.flops import counting, flop_report
from mixmae_core.masking import pair_rows, patchify, upsample_mask
from mixmae_core.methods import METHODS, check_method_encoder, create_pretraining_model, mask_spec
from tests.helpers_core import partner_leaks, seeded_images

HIERARCHICAL = ["mixmae_swin_micro_w8", "mixmae_twins_svt_micro", "mixmae_pvt_v2_micro"]


def _partner_leaks(name: str, size: int = 128) -> bool:
    torch.manual_seed(0)
    return partner_leaks(mixmae_core.create_model(name, img_size=size).eval(), size)


@pytest.mark.parametrize("name", HIERARCHICAL)
def test_an_images_prediction_does_not_change_when_its_partner_does(name):
    assert not _partner_leaks(name)


@pytest.mark.parametrize("name", ["mixmae_twins_svt_micro", "mixmae_pvt_v2_micro"])
def test_the_isolation_test_fails_when_convolutions_read_the_partner(name, monkeypatch):
    monkeypatch.setattr(convs, "per_group", lambda op, x, groups: op(x))
    for module in ("twins", "pvt_v2"):
        monkeypatch.setattr(f"mixmae_core.encoders.{module}.per_group", lambda op, x, groups: op(x))
    assert _partner_leaks(name)


@pytest.mark.parametrize("name", ["mixmae_twins_svt_micro", "mixmae_pvt_v2_micro"])
def test_the_isolation_test_fails_when_reduced_keys_lose_their_groups(name, monkeypatch):
    from mixmae_core.encoders.attention import AttentionContext

    def ungrouped(impl, x, sr_ratio, groups):
        return impl.prepare(AttentionContext())

    for module in ("twins", "pvt_v2"):
        monkeypatch.setattr(f"mixmae_core.encoders.{module}.reduction_context", ungrouped)
    assert _partner_leaks(name)


@pytest.mark.parametrize("ours,timms", [("mixmae_twins_svt_small", "twins_svt_small"), ("mixmae_pvt_v2_b0", "pvt_v2_b0")])
def test_twins_and_pvt_hold_timms_parameters_and_compute_timms_function(ours, timms):
    torch.manual_seed(0)
    reference = timm.create_model(timms).eval()
    model = timm.create_model(ours).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = seeded_images(2, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)


@pytest.mark.parametrize("name", ["mixmae_twins_svt_micro", "mixmae_pvt_v2_micro"])
def test_features_only_gives_four_levels(name):
    features = timm.create_model(name, features_only=True, img_size=128)
    maps = features(seeded_images(2, 128))
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert features.feature_info.reduction() == [4, 8, 16, 32]


def test_a_key_reduction_across_mask_units_is_refused():
    with pytest.raises(ValueError, match="64-px cells, which do not divide the 32-px mask units"):
        timm.create_model("mixmae_pvt_v2_micro", sr_ratios=(16, 4, 2, 1))


@pytest.mark.parametrize("name", HIERARCHICAL)
def test_simmim_visible_tokens_never_see_masked_pixels(name):
    """The encoder's output does not change with the pixels under the mask (a stem whose
    kernels overlap the units, PVTv2's, reads them only if it is not run per group)."""
    torch.manual_seed(0)
    model = simmim.create_model(name).eval()
    masked = pair_rows(torch.tensor([[[1, 0], [0, 1]], [[0, 1], [1, 1]]]).bool())
    images = seeded_images()
    changed = torch.where(upsample_mask(masked, (64, 64))[:, None], torch.randn_like(images), images)
    with torch.no_grad():
        assert torch.allclose(model.forward_encoder(images, masked), model.forward_encoder(changed, masked), atol=1e-5)


def test_simmim_loss_is_l1_on_masked_pixels_only():
    torch.manual_seed(0)
    model = simmim.create_model("mixmae_swin_micro_w8")
    images = seeded_images()
    masks = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [1, 0]], [[0, 0], [1, 1]], [[1, 1], [1, 0]]]).bool()
    out = model(images, masks)
    pixels = upsample_mask(masks, (64, 64))[:, None].expand_as(images)
    assert torch.allclose(out.loss, (out.pred - images).abs()[pixels].mean(), rtol=1e-5)
    assert out.pred.shape == images.shape


def test_mae_encodes_a_quarter_of_the_patches_and_scores_only_the_dropped_ones():
    torch.manual_seed(0)
    model = mae.create_model("mae_vit_micro_p8")
    images = seeded_images()
    masks = model.mask_spec.draw_rows([0, 1])
    assert masks.flatten(1).sum(1).tolist() == [48] * 4
    latent, _ = model.forward_encoder(images, masks.flatten(1))
    assert latent.shape[1] == 1 + 64 // 4
    out = model(images, masks)
    target = patchify(images, 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (out.pred - target).pow(2).mean(-1)
    assert torch.allclose(out.loss, per_patch[out.masks.flatten(1)].mean(), rtol=1e-5)
    assert not model.encoder.pos_embed.requires_grad  # MAE's fixed sin-cos table


def test_mae_encodes_the_kept_patches_whatever_their_order():
    """The kept tokens enter the blocks in raster order (MAE's code: in shuffled order); the
    blocks see a set, so each kept patch's encoding is the same either way."""
    torch.manual_seed(0)
    model = mae.create_model("mae_vit_micro_p8").eval()
    images, masks = seeded_images(2), model.mask_spec.draw_rows([5])
    dropped = masks.flatten(1)
    latent, _ = model.forward_encoder(images, dropped)
    encoder = model.encoder
    with torch.no_grad():
        x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]
        shuffled = [(~dropped[b]).nonzero().flatten()[torch.randperm(16)] for b in range(2)]
        tokens = torch.stack([x[b, shuffled[b]] for b in range(2)])
        cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(2, -1, -1)
        reference = encoder.norm(encoder.blocks(torch.cat([cls, tokens], dim=1)))
        for b in range(2):
            raster = (~dropped[b]).nonzero().flatten().tolist()
            order = [raster.index(i) for i in shuffled[b].tolist()]
            assert torch.allclose(latent[b, 1:][order], reference[b, 1:], atol=1e-5)
            assert torch.allclose(latent[b, 0], reference[b, 0], atol=1e-5)


@pytest.mark.parametrize(
    "variant,found",
    [
        (dict(reg_tokens=4), "4 register tokens"),
        (dict(no_embed_class=True), "no_embed_class=True"),
        (dict(pre_norm=True), "pre_norm=True"),
        (dict(class_token=False, global_pool="avg"), "no class token"),
    ],
)
def test_mae_refuses_a_vit_it_would_train_as_another_model(variant, found):
    with torch.device("meta"), pytest.raises(ValueError) as refused:
        create_pretraining_model("mae", "mae_vit_micro_p8", img_size=64, **variant)
    message = str(refused.value)
    assert found in message and "mae_vit_micro_p8" in message and "MAE computes a plain timm ViT" in message


def test_vit_base_mae_has_the_papers_size():
    with torch.device("meta"):
        model = mae.create_model("vit_base_patch16_224")
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(111.9, abs=0.1)


@pytest.mark.parametrize(
    "method,encoder,match",
    [
        ("mae", "mixmae_swin_micro_w8", "MAE pretrains a plain ViT .*a hierarchical encoder: pretrain it with mixmae or simmim"),
        ("simmim", "mae_vit_micro_p8", "a plain ViT: pretrain it with mae"),
        ("mixmae", "resnet50", "MixMAE pretrains a hierarchical encoder .*which no method here pretrains"),
        ("beit", "mixmae_swin_micro_w8", "BEiT pretrains a timm BEiT .*a hierarchical encoder: pretrain it with mixmae or simmim"),
        ("mae", "beit_micro_p8", "a BEiT: pretrain it with beit"),
        ("bert", "mixmae_swin_micro_w8", "unknown pretraining method"),
    ],
)
def test_a_method_that_cannot_drive_an_encoder_says_why(method, encoder, match):
    with pytest.raises(ValueError, match=match):
        check_method_encoder(method, encoder)


def test_depthwise_convolution_gradients_cost_what_their_forward_does():
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
    x = torch.randn(1, 64, 16, 16, requires_grad=True)
    with counting() as counter:
        conv(x).sum().backward()
    forward = 2 * 64 * 9 * 16 * 16
    assert counter.get_total_flops() == 3 * forward  # torch's own formula says 65x


def test_train_flops_follow_what_each_method_encodes():
    mixmae_flops = flop_report("mixmae_swin_micro_w8", method="mixmae").train_gflops_per_image
    simmim_flops = flop_report("mixmae_swin_micro_w8", method="simmim").train_gflops_per_image
    # both encode every token once per image; MixMAE's decoder is the difference
    assert simmim_flops < mixmae_flops < 1.3 * simmim_flops
    keep_quarter = flop_report("mae_vit_micro_p8", method="mae").train_gflops_per_image
    keep_most = flop_report("mae_vit_micro_p8", method="mae", mask_ratio=0.25).train_gflops_per_image
    assert keep_quarter < 0.6 * keep_most  # MAE's encoder runs on the kept tokens only


METHOD_ENCODERS = [("mixmae", "mixmae_pvt_v2_micro"), ("simmim", "mixmae_twins_svt_micro"), ("mae", "mae_vit_micro_p8"),
                   ("beit", "beit_micro_p8")]


def test_every_method_is_in_the_comparison():
    assert [method for method, _ in METHOD_ENCODERS] == list(METHODS)


@pytest.mark.parametrize("method,encoder", METHOD_ENCODERS)
def test_every_method_learns_a_fixed_batch_through_the_one_factory_and_step(method, encoder):
    torch.manual_seed(0)
    model = create_pretraining_model(method, encoder, img_size=64, mask_ratio=0.5).train()
    spec = mask_spec(method, encoder, img_size=64, mask_ratio=0.5)
    assert spec == model.mask_spec
    images, masks = seeded_images(), spec.draw_rows([0, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        out = model(images, masks)
        assert torch.equal(out.masks, masks) and all(v.dim() == 0 for v in out.metrics.values())
        losses.append(out.loss.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])


