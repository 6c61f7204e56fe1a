import pytest
import torch

import mixmae_core
from mixmae_core.fast import StepOptions, apply_step_options, make_train_step
from mixmae_core.masking import MaskSpec
from mixmae_core.encoders.attention import AttentionContext, get_attention

MICRO = "mixmae_swin_micro_w8"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("with_positions", [False, True])
def test_flex_attention_matches_reference_forward(with_positions):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 4, 49, 16, generator=g) for _ in range(3))
    bias = torch.randn(4, 49, 49, generator=g)
    segments = torch.randint(0, 3, (6, 49), generator=g, dtype=torch.uint8)
    positions = torch.stack([torch.randperm(49, generator=g) for _ in range(6)]) if with_positions else None
    outs = []
    for name in ("reference", "flex"):
        impl = get_attention(name)
        outs.append(impl.attend(q, k, v, bias, impl.prepare(AttentionContext(segments, positions)), 0.25))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile must be"):
        apply_step_options(mixmae_core.create_model(MICRO), StepOptions(compile="everything"))


def _steps(options, images, masks):
    torch.manual_seed(0)
    model = apply_step_options(mixmae_core.create_model(MICRO, img_size=128), options)
    step, _ = make_train_step(model, options, lr=1e-3)
    losses = [step(images, m) for m in masks]
    return torch.stack(losses), model


def test_fast_step_matches_reference_step_over_several_updates():
    """Same weights after three AdamW updates on fresh masks (CPU: fp32, so tight). The
    compiled variants are checked the same way by benchmarks/pretrain_throughput.py, where
    compiling is cheap enough (the suite would spend minutes compiling on 2 cores)."""
    options = StepOptions(split_groups=True, fused_adamw=True)
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    masks = [MaskSpec((4, 4), 0.5, "shared").draw_rows([2 * i, 2 * i + 1]) for i in range(3)]
    ref_losses, ref = _steps(StepOptions(), images, masks)
    fast_losses, fast = _steps(options, images, masks)
    assert torch.allclose(ref_losses, fast_losses, rtol=1e-4)
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(a, b, atol=1e-4), name  # Adam turns 1e-7 grad noise into ~1e-5 steps


def test_a_pretraining_worker_loads_neither_inductor_nor_torchmetrics_until_asked():
    """Every Ray Train worker imports its stage module; FlexAttention (torch's inductor) and
    torchmetrics cost seconds each and pretraining on the default path uses neither."""
    import subprocess
    import sys

    code = (
        "import sys, pipelines.stages.pretrain\n"
        "heavy = ('torch._inductor.compile_fx', 'torchmetrics', 'torch.nn.attention.flex_attention')\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "from mixmae_core.encoders.attention import get_attention\n"
        "assert get_attention('flex').name == 'flex' and 'torch._inductor.compile_fx' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
