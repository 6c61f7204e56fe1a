import pytest
import timm
import torch
from PIL import Image

import mixmae_core
from mixmae_core.checkpoint import encoder_state_dict, load_encoder_weights, load_state_dict, save_state_dict
from mixmae_core.flops import flop_report
from mixmae_core.viz import save_reconstruction_png

MICRO = "mixmae_swin_micro_w8"


def test_pretraining_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = mixmae_core.create_model(MICRO).eval()
    path = tmp_path / "pretrain.safetensors"
    save_state_dict(path, model.state_dict(), {"model": MICRO})
    torch.manual_seed(1)
    again = mixmae_core.create_model(MICRO).eval()
    again.load_state_dict(load_state_dict(path))
    images, masks = torch.randn(2, 3, 64, 64), torch.tensor([[1, 0], [0, 1]]).bool().expand(2, 2, 2)
    assert torch.equal(model(images, masks).loss, again(images, masks).loss)
    assert not (tmp_path / "pretrain.safetensors.tmp").exists()


def test_classifier_loads_pretraining_weights_and_drops_decoder(tmp_path):
    torch.manual_seed(0)
    pre = mixmae_core.create_model(MICRO)
    path = tmp_path / "pre.safetensors"
    save_state_dict(path, pre.state_dict())
    clf = timm.create_model(MICRO, num_classes=7, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    enc = pre.encoder.state_dict()
    for key, value in clf.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, enc[key]), key
    assert clf.head.out_features == 7
    # also through the plain helper, with the 1000-class default head kept
    clf2 = timm.create_model(MICRO)
    load_encoder_weights(clf2, path)
    assert torch.equal(clf2.layers[2].blocks[1].mlp.fc1.weight, pre.encoder.layers[2].blocks[1].mlp.fc1.weight)


def test_position_tables_resize_for_new_windows_and_resolution(tmp_path):
    pre = mixmae_core.create_model(MICRO)  # 64 px, stage windows 8,8,4,2
    with torch.no_grad():
        for name, p in pre.encoder.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.arange(p.shape[1], dtype=torch.float).expand_as(p))
    path = tmp_path / "pre.safetensors"
    save_state_dict(path, pre.state_dict())
    big = timm.create_model(MICRO, img_size=256, window_size=(16, 16, 16, 8), num_classes=3)
    load_encoder_weights(big, path)
    table = big.layers[2].blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * 16 - 1) ** 2, 4)  # stage 3: 16x16 map, window 16 (was 4)
    assert torch.allclose(table, torch.arange(4.0).expand_as(table), atol=1e-4)
    assert big.absolute_pos_embed.shape == (64, 64, 32)
    assert big(torch.randn(1, 3, 256, 256)).shape == (1, 3)


def test_encoder_state_dict_understands_every_layout():
    pre = mixmae_core.create_model(MICRO)
    enc = encoder_state_dict(pre.state_dict())
    assert set(enc) == set(pre.encoder.state_dict())
    assert not any(k.startswith("decoder") for k in enc)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state_dict(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    "name,params_m,gflops",
    [("mixmae_swin_base_w14", 88.0, 16.3), ("mixmae_swin_large_w14", 197.0, 35.9)],
)
def test_params_and_flops_match_the_paper(name, params_m, gflops):
    report = flop_report(name)
    assert report.params_m == pytest.approx(params_m, rel=0.01)
    assert report.gflops == pytest.approx(gflops, rel=0.01)
    # one pretraining step (forward + backward) costs about 3x the forward of encoder+decoder
    assert 5 * report.gflops < report.train_gflops_per_image < 8 * report.gflops


def test_reconstruction_png_is_written(tmp_path):
    model = mixmae_core.create_model(MICRO)
    images = torch.randn(4, 3, 64, 64)
    panels = model.panels(images, model(images, model.mask_spec.draw_rows([0, 1])))
    path = save_reconstruction_png(tmp_path / "rec.png", panels)
    with Image.open(path) as im:
        # 2 pairs -> 2 rows of 6 panels of 64 px with 2 px padding
        assert im.size == (6 * 66 + 2, 2 * 66 + 2)
