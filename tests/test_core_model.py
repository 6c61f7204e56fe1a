import pytest
import timm
import torch

import mixmae_core
from mixmae_core.encoders.attention import (
    PAD_SEGMENT,
    AttentionContext,
    ReferenceAttention,
    get_attention,
    register_attention,
)
from mixmae_core.masking import mix_images, mix_pairs, pair_rows, sample_mask, upsample_mask
from mixmae_core.masking import norm_pix_target
from tests.helpers_core import partner_leaks, seeded_images

MICRO = "mixmae_swin_micro_w8"


def _micro(**kw):
    torch.manual_seed(0)
    return mixmae_core.create_model(MICRO, **kw).eval()


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_partner_pixels_do_not_reach_image_prediction_or_features(impl):
    assert not partner_leaks(_micro(attn_impl=impl))


def test_isolation_test_fails_without_attention_masking():
    class Unmasked(ReferenceAttention):
        name = "unmasked-for-test"

        def prepare(self, context):
            return AttentionContext(positions=context.positions)

    register_attention(Unmasked.name, Unmasked)
    assert partner_leaks(_micro(attn_impl="unmasked-for-test"))


def test_loss_equals_independent_norm_pix_mse_and_outputs_have_contract_shapes():
    model = _micro()
    images = seeded_images(6)
    out = model(images, model.mask_spec.draw_rows([0, 1, 2]))
    assert out.pred.shape == (6, 4, 32 * 32 * 3) and out.metrics == {}
    assert out.masks.shape == (6, 2, 2) and out.masks.dtype == torch.bool
    patches = images.reshape(6, 3, 2, 32, 2, 32).permute(0, 2, 4, 3, 5, 1).reshape(6, 4, -1)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, unbiased=True, keepdim=True)
    target = (patches - mean) / (var + 1e-6).sqrt()
    assert torch.allclose(out.loss, ((out.pred - target) ** 2).mean(), rtol=1e-6)
    assert torch.allclose(norm_pix_target(images, 32), target, atol=1e-6)


def test_each_prediction_comes_from_the_copy_where_its_patch_was_hidden():
    """pred[b] at a position never depends on image b's own patch there, nor on any
    patch of the same group: the copy predicting it saw only the other group."""
    model = _micro()
    images = seeded_images()
    mask = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 0]]]).bool()
    with torch.no_grad():
        base = model(images, pair_rows(mask)).pred
    for b in range(4):
        m = mask[b // 2].flatten()
        for p in range(4):
            changed = images.clone()
            r, c = divmod(p, 2)
            changed[b, :, r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] += torch.randn(3, 32, 32)
            with torch.no_grad():
                pred = model(changed, pair_rows(mask)).pred
            same_group = (m == m[p]).nonzero().flatten()
            assert torch.allclose(pred[b, same_group], base[b, same_group], atol=1e-5), (b, p)
            other = (m != m[p]).nonzero().flatten()
            assert not torch.allclose(pred[b, other], base[b, other], atol=1e-4), (b, p)


def test_mixing_shows_every_pixel_of_a_pair_exactly_once_across_its_two_inputs():
    mask = sample_mask(5, (7, 7), 0.5, generator=torch.Generator().manual_seed(2))
    # pixel value = image * 10**6 + position: the mixed rows say whose pixel sits where
    images = (torch.arange(10)[:, None] * 10**6 + torch.arange(224 * 224)).view(10, 1, 224, 224)
    mixed = mix_images(images, pair_rows(mask))
    unit_of = torch.arange(224)[:, None] // 32 * 7 + torch.arange(224)[None] // 32
    for k in range(5):
        shown = mixed[2 * k : 2 * k + 2].flatten()
        assert torch.equal(shown.sort().values, images[2 * k : 2 * k + 2].flatten().sort().values)
        # row 2k shows its own pixels where its unit's mask is clear, its partner's where set
        source = torch.where(mask[k].flatten()[unit_of], 2 * k + 1, 2 * k)
        assert torch.equal(mixed[2 * k, 0], source * 10**6 + torch.arange(224 * 224).view(224, 224))
    assert (mixed != images).any()  # the check above is not vacuous: pixels moved
    # the model mixes NHWC tokens the same way
    tokens = mix_pairs(images.permute(0, 2, 3, 1), upsample_mask(pair_rows(mask), (224, 224)))
    assert torch.equal(tokens.permute(0, 3, 1, 2), mixed)


def test_fixed_masks_make_the_step_deterministic_and_a_pair_takes_one_map():
    model = _micro()
    images = seeded_images()
    masks = torch.tensor([[1, 0], [0, 1]]).bool().expand(4, 2, 2)
    a, b = model(images, masks), model(images, masks.clone())
    assert torch.equal(a.loss, b.loss) and torch.equal(a.pred, b.pred)
    apart = masks.clone()
    apart[1] = ~apart[1]
    with pytest.raises(ValueError, match="rows 2k and 2k\\+1 take one map"):
        model(images, apart)


def test_odd_batch_is_refused_with_reason():
    with pytest.raises(ValueError, match="must be even"):
        _micro()(seeded_images(3), torch.zeros(3, 2, 2, dtype=torch.bool))


def test_batch_mask_mode_shares_one_mask():
    model = _micro(mask_mode="batch")
    masks = model.mask_spec.draw_rows(range(4))
    assert not (masks == masks[0]).all()
    out = model(seeded_images(8), masks)
    assert (out.masks == masks[0]).all()


@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("with_positions", [False, True])
def test_reference_and_sdpa_attention_agree_with_gradients(with_padding, with_positions):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 4, 49, 16, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(4, 49, 49, generator=g, requires_grad=True)
    segments = torch.randint(0, 2, (6, 49), generator=g, dtype=torch.uint8)
    if with_padding:
        segments[:, -5:] = PAD_SEGMENT
    positions = torch.stack([torch.randperm(49, generator=g) for _ in range(6)]) if with_positions else None
    outs, grads = [], []
    for name in ("reference", "sdpa"):
        impl = get_attention(name)
        out = impl.attend(q, k, v, bias, impl.prepare(AttentionContext(segments, positions)), 0.25)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v, bias)))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4)


def test_whole_model_agrees_across_attention_impls():
    ref, sdpa = _micro(attn_impl="reference"), _micro(attn_impl="sdpa")
    images, masks = seeded_images(), torch.tensor([[1, 0], [1, 0]]).bool().expand(4, 2, 2)
    assert torch.allclose(ref(images, masks).loss, sdpa(images, masks).loss, rtol=1e-5)


def test_unknown_attention_impl_is_refused():
    with pytest.raises(ValueError, match="unknown attention"):
        _micro(attn_impl="nope")


@pytest.mark.parametrize(
    "img_size,windows",
    [(192, (12, 12, 12, 6)), (384, (16, 16, 24, 12)), (256, (16, 16, 16, 8))],
)
def test_other_input_sizes_build_and_run(img_size, windows):
    model = timm.create_model(
        "mixmae_swin_micro_w8", img_size=img_size, window_size=windows, num_classes=3
    )
    assert model(torch.randn(1, 3, img_size, img_size)).shape == (1, 3)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(img_size=200), "multiple of the encoder stride 32"),
        (dict(img_size=96, window_size=(8, 8, 8, 8)), "stage 2 has a 12x12 token map"),
        (dict(img_size=224, window_size=(14, 14, 14)), "one entry per stage"),
        (dict(mask_ratio=1.0), "strictly between 0 and 1"),
    ],
)
def test_invalid_configurations_fail_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        mixmae_core.create_model(MICRO, **kw)


def test_classifier_and_stage_features_from_timm():
    clf = timm.create_model("mixmae_swin_base_w14", num_classes=1000)
    assert isinstance(clf, mixmae_core.MixMAESwin)
    feats = timm.create_model(MICRO, features_only=True, img_size=128)
    maps = feats(torch.randn(2, 3, 128, 128))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]


def test_dense_inputs_that_do_not_tile_are_padded_to_windows():
    model = timm.create_model(MICRO, features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 96, 160))
    assert [tuple(m.shape[-2:]) for m in maps] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    assert all(torch.isfinite(m).all() for m in maps)


def test_padding_slots_are_never_attended():
    from mixmae_core.encoders.swin import SwinLevel

    torch.manual_seed(0)
    stage = SwinLevel(16, 16, 1, 2, (8, 8), downsample=False, drop_path=[0.0]).eval()
    attention = get_attention("reference")
    x = torch.randn(1, 12, 20, 16)
    layout = stage.layout(x, None, None)
    assert layout.index.shape == (6, 64) and (~layout.valid).sum() == 6 * 64 - 12 * 20
    seq = layout.gather(x)
    assert (seq[~layout.valid] == 0).all()
    context = attention.prepare(AttentionContext(layout.segments))
    noisy = torch.where(layout.valid[..., None], seq, torch.randn_like(seq))
    block = stage.blocks[0]
    with torch.no_grad():
        bias = block.attn.relative_bias()
        a, b = block(seq, attention, context, bias), block(noisy, attention, context, bias)
    assert torch.allclose(a[layout.valid], b[layout.valid], atol=1e-5)
    assert torch.equal(layout.scatter(seq, x.shape), x)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_group_split_layout_computes_the_same_step(impl):
    """One sequence per (image, group) in global-window stages: same loss, same gradients."""
    images = seeded_images(4, 128)
    mask = sample_mask(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(5))
    losses, grads = [], []
    for split in (False, True):
        model = _micro(img_size=128, attn_impl=impl, split_groups=split)
        out = model(images, pair_rows(mask))
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    stage4 = model.encoder.layers[3]
    assert stage4.layout(torch.zeros(4, 4, 4, 1), torch.zeros(4, 4, 4, dtype=torch.uint8), 8).positions is not None
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-5, rtol=1e-4), name


def test_group_layout_has_no_cross_image_slots():
    from mixmae_core.encoders.attention import group_layout

    segments = upsample_mask(pair_rows(sample_mask(3, (4, 4), 0.5)), (8, 8)).to(torch.uint8)
    layout = group_layout(6, 8, 8, segments, 8 * 4)
    flat = segments.flatten()
    for s in range(layout.index.shape[0]):
        groups = flat[layout.index[s]] if layout.valid is None else flat[layout.index[s][layout.valid[s]]]
        assert (groups == groups[0]).all() and (layout.index[s] // 64 == s // 2).all()
    x = torch.randn(6, 8, 8, 5)
    assert torch.equal(layout.scatter(layout.gather(x), x.shape), x)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = mixmae_core.create_model(MICRO).train()
    images = seeded_images(4)
    masks = torch.tensor([[1, 0], [0, 1]]).bool().expand(4, 2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    first = None
    for step in range(150):
        loss = model(images, masks).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())
