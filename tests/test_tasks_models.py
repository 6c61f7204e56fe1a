"""Task models of the transfer stages: Mask R-CNN, UperNet, classifier and linear probe."""

import pytest
import torch

import mixmae_core
from mixmae_core.checkpoint import save_state_dict
from mixmae_core.tasks.classification import build_classifier, build_linear_probe
from mixmae_core.tasks.detection import build_mask_rcnn
from mixmae_core.encoders.swin import MixMAESwin
from mixmae_core.tasks.segmentation import build_upernet, dense_trunk

MICRO = "mixmae_swin_micro_w8"
SIZE = 128
# Fewer proposals and RoI samples than the COCO defaults keep a CPU step short.
SMALL_DETECTOR = dict(
    fpn_channels=64,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=100,
    rpn_batch_size_per_image=64,
    box_batch_size_per_image=64,
    box_detections_per_img=10,
)
LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretraining checkpoint (encoder + decoder) and its encoder weights."""
    torch.manual_seed(123)
    model = mixmae_core.create_model(MICRO, img_size=SIZE)
    path = tmp_path_factory.mktemp("ckpt") / "pretrain.safetensors"
    save_state_dict(path, model.state_dict())
    return path, {k: v.clone() for k, v in model.encoder.state_dict().items()}


def rectangle_sample():
    """One image with a filled rectangle and its COCO-style target (class 1)."""
    image = torch.full((3, SIZE, SIZE), 0.2)
    image[:, 40:88, 32:96] = torch.tensor([0.9, 0.3, 0.1])[:, None, None]
    mask = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    mask[:, 40:88, 32:96] = 1
    return image, {"boxes": torch.tensor([[32.0, 40.0, 96.0, 88.0]]), "labels": torch.tensor([1]), "masks": mask}


def test_mask_rcnn_train_losses_and_eval_detections():
    torch.manual_seed(0)
    model = build_mask_rcnn(MICRO, 3, img_size=SIZE, **SMALL_DETECTOR)
    image, target = rectangle_sample()
    losses = model.train()([image], [target])
    assert set(losses) == LOSS_KEYS
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())

    with torch.no_grad():
        out = model.eval()([image, image.flip(-1)])
    assert len(out) == 2
    for det in out:
        n = len(det["boxes"])
        assert 0 < n <= SMALL_DETECTOR["box_detections_per_img"]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert det["masks"].shape == (n, 1, SIZE, SIZE)
        assert ((det["labels"] >= 1) & (det["labels"] <= 2)).all()  # background is never returned
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= SIZE).all()


def test_mask_rcnn_fpn_levels():
    model = build_mask_rcnn(MICRO, 2, img_size=SIZE, **SMALL_DETECTOR).eval()
    with torch.no_grad():
        levels = model.backbone(torch.randn(1, 3, SIZE, SIZE))
    assert {k: tuple(v.shape) for k, v in levels.items()} == {
        "0": (1, 64, 32, 32),
        "1": (1, 64, 16, 16),
        "2": (1, 64, 8, 8),
        "3": (1, 64, 4, 4),
        "pool": (1, 64, 2, 2),
    }


def test_mask_rcnn_learns_a_rectangle():
    torch.manual_seed(0)
    model = build_mask_rcnn(MICRO, 2, img_size=SIZE, drop_path_rate=0.0, **SMALL_DETECTOR).train()
    image, target = rectangle_sample()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    history = []
    for _ in range(6):
        loss = sum(model([image], [target]).values())
        optimizer.zero_grad()
        loss.backward()
        # DDP (without find_unused_parameters) needs a gradient for every parameter
        assert [n for n, p in model.named_parameters() if p.grad is None] == []
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0], history


def _assert_holds_encoder(trunk, encoder_state):
    """Every trunk weight is the checkpoint's; the checkpoint keys left out are unused ones."""
    state = trunk.state_dict()
    for key, value in state.items():
        assert torch.equal(value, encoder_state[key]), key
    return set(encoder_state) - set(state)


def test_pretrained_encoder_weights_reach_every_task_model(pretrained):
    path, encoder_state = pretrained
    detector = build_mask_rcnn(MICRO, 3, img_size=SIZE, encoder_weights=path, **SMALL_DETECTOR)
    upernet = build_upernet(MICRO, 5, img_size=SIZE, encoder_weights=path, decoder_channels=32)
    classifier = build_classifier(MICRO, 10, img_size=SIZE, encoder_weights=path)
    probe = build_linear_probe(MICRO, 10, img_size=SIZE, encoder_weights=path)
    # Dense heads normalise each level themselves: the encoder's final norm is dropped.
    assert _assert_holds_encoder(detector.backbone.encoder.model, encoder_state) == {"norm.weight", "norm.bias"}
    assert _assert_holds_encoder(dense_trunk(upernet), encoder_state) == {"norm.weight", "norm.bias"}
    assert _assert_holds_encoder(probe.encoder, encoder_state) == set()
    head = {k: v for k, v in classifier.state_dict().items() if k.startswith("head.")}
    assert {k: tuple(v.shape) for k, v in head.items()} == {"head.weight": (10, 256), "head.bias": (10,)}
    assert _assert_holds_encoder(classifier, {**encoder_state, **head}) == set()


def test_task_models_switch_attention_of_their_encoder(monkeypatch):
    switched = []
    monkeypatch.setattr(MixMAESwin, "set_attn_impl", lambda self, name: switched.append((self, name)))
    models = [
        build_mask_rcnn(MICRO, 2, img_size=SIZE, **SMALL_DETECTOR),
        build_upernet(MICRO, 5, img_size=SIZE, decoder_channels=32),
        build_linear_probe(MICRO, 4, img_size=SIZE),
    ]
    for model in models:
        switched.clear()
        model.set_attn_impl("reference")
        encoders = [m for m in model.modules() if isinstance(m, MixMAESwin)]
        assert len(encoders) == 1 and switched == [(encoders[0], "reference")], type(model)


@pytest.mark.parametrize("height, width", [(128, 128), (96, 160)])
def test_upernet_logits_at_input_resolution(height, width):
    # 96x160 is not a multiple of the stage windows: the encoder pads them internally.
    model = build_upernet(MICRO, 7, img_size=SIZE, decoder_channels=32).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, height, width))
    assert logits.shape == (2, 7, height, width)
    assert torch.isfinite(logits).all()


def test_upernet_gives_every_parameter_a_gradient():
    model = build_upernet(MICRO, 7, img_size=SIZE, decoder_channels=32).train()
    target = torch.randint(0, 7, (2, SIZE, SIZE))
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, SIZE, SIZE)), target).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_linear_probe_trains_only_the_head():
    torch.manual_seed(0)
    probe = build_linear_probe(MICRO, 4, img_size=SIZE).train()
    trainable = {n for n, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    assert {id(p) for p in probe.trainable_parameters()} == {id(p) for p in probe.head[1].parameters()}
    assert not probe.encoder.training

    images, labels = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 3])
    before = probe.features(images)
    head_before = probe.head[1].weight.detach().clone()
    optimizer = torch.optim.SGD(probe.trainable_parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(probe(images), labels).backward()
    optimizer.step()
    assert torch.equal(probe.features(images), before)
    assert not torch.equal(probe.head[1].weight, head_before)
    assert all(p.grad is None for p in probe.encoder.parameters())
