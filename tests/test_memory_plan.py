"""One worker's memory and `mixmae plan --gpu-mem`: the activation checkpointing switch, the
activation estimate against a measured peak, the plan's fields, verdicts and warnings."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mixmae_core.masking import sample_mask
from mixmae_core.methods import create_pretraining_model, pretraining_step
from mixmae_core.tasks.classification import build_classifier
from pipelines.cli import app
from pipelines.config import DEFAULT_CONFIG, REPO_ROOT, ConfigError, load_config
from mixmae_core.encoders.base import apply_grad_checkpointing
from pipelines.memory import check_pretraining_peak
from pipelines.worker_memory import GIB
from pipelines.stages.jobs import StageJob


def small_config(tmp_path: Path, cpus_per_worker: float = 2) -> Path:
    """Every task on the micro encoder, on two GPU workers with the fast path (bf16), images counted, not read."""
    scaling = {"num_workers": 2, "use_gpu": True, "cpus_per_worker": cpus_per_worker}

    def stage(layout: str, **fields) -> dict:
        return {"img_size": 64, "data": {"layout": layout, "root": "/nowhere", "num_images": 1000}, "epochs": 1,
                "batch_size": 32, "fast": True, "scaling": scaling, **fields}

    config = {
        "name": "small",
        "pretrain": {"model": "mixmae_swin_micro_w8", **stage("imagefolder")},
        "stages": {
            "finetune": stage("inat", task="classify"),
            "probe": stage("inat", task="classify", mode="linear_probe"),
            "coco": stage("coco", task="detect", img_size=96, batch_size=4, fpn_channels=64, head_channels=32,
                          box_head_dim=128, rois_per_image=64, proposals=100, detections_per_image=20),
            "ade20k": stage("ade20k", task="segment", batch_size=4, num_classes=5, decoder_channels=32),
        },
    }
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_checkpointing_is_off_by_default_and_refused_where_the_model_would_ignore_it(tmp_path):
    config = load_config(DEFAULT_CONFIG)
    assert not any(stage.grad_checkpointing for stage in config.all_stages().values())
    on = load_config(DEFAULT_CONFIG, ["pretrain.grad_checkpointing=true", "stages.coco.grad_checkpointing=true"])
    assert on.pretrain.grad_checkpointing and on.stages["coco"].grad_checkpointing
    for method, model, name in (("mae", "mae_vit_micro_p8", "MAE"), ("beit", "beit_micro_p8", "BEiT")):
        overrides = [f"pretrain.method={method}", f"pretrain.model={model}", "pretrain.grad_checkpointing=true"]
        with pytest.raises(ConfigError, match=rf"pretrain: grad_checkpointing: {name}'s pretraining model runs its "
                                              r"ViT's blocks itself"):
            load_config(DEFAULT_CONFIG, overrides, pretrain_only=True)


@pytest.mark.parametrize("stage", ["pretrain", "inat2018", "coco", "ade20k"])
def test_the_switch_reaches_the_encoder_of_every_stage_model(stage):
    """Through the stage's own build (the worker's), whatever wraps the encoder."""
    import importlib

    config = load_config(DEFAULT_CONFIG, [f"{'pretrain' if stage == 'pretrain' else 'stages.' + stage}"
                                          ".grad_checkpointing=true"])
    spec = config.all_stages()[stage]
    job = StageJob(stage, spec, config.stage_model(spec), num_classes=5)
    model = importlib.import_module(f"pipelines.stages.{spec.task}").TASK(job).build(torch.device("cpu"))
    switches = [m.grad_checkpointing for m in model.modules() if hasattr(m, "grad_checkpointing")]
    assert switches and all(switches)


def test_a_micro_model_trains_the_same_with_checkpointing():
    """One step with and without: the same loss and gradients, within float noise (drop path
    included: checkpointing replays the random state)."""
    torch.manual_seed(0)
    pretraining = create_pretraining_model("mixmae", "mixmae_swin_micro_w8", img_size=64)
    classifier = build_classifier("mixmae_swin_micro_w8", 5, img_size=64, drop_path_rate=0.2)
    images, mask = torch.randn(4, 3, 64, 64), sample_mask(2, (2, 2), 0.5)
    steps = {"pretraining": (pretraining, lambda m: pretraining_step(m, images, mask).loss),
             "classifier": (classifier, lambda m: m(images).logsumexp(-1).mean())}
    for name, (model, step) in steps.items():
        results = []
        for checkpointing in (False, True):
            copy_ = apply_grad_checkpointing(copy.deepcopy(model).train(), checkpointing)
            torch.manual_seed(1)
            loss = step(copy_)
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in copy_.named_parameters() if p.grad is not None}))
        (loss_off, grads_off), (loss_on, grads_on) = results
        torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-7, msg=name)
        assert grads_on.keys() == grads_off.keys()
        for key in grads_off:
            torch.testing.assert_close(grads_on[key], grads_off[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("encoder,img_size,batch", [("mixmae_swin_micro_w8", 64, 8), ("mixmae_swin_tiny_w14", 224, 2)])
def test_the_activation_estimate_brackets_the_measured_peak(encoder, img_size, batch, checkpointing):
    """Tolerance: the peak measured on the CPU lies between 85% of the activation estimate
    (what the estimate holds that is never live at once: with checkpointing, a block's input
    counted both kept and recomputed) and the estimate plus the gradients, the plan's bound."""
    check = check_pretraining_peak(encoder, img_size, batch, checkpointing)
    assert 0.85 * check.activations <= check.measured <= check.activations + check.gradients, check


def test_the_plan_prints_one_workers_memory_and_whether_it_fits(tmp_path):
    config = str(small_config(tmp_path))
    roomy = CliRunner().invoke(app, ["plan", config, "--gpu-mem", "80", "--json"])
    assert roomy.exit_code == 0, roomy.output
    bills = {b["stage"]: b for b in json.loads(roomy.output)}
    for name, b in bills.items():
        m = b["memory"]
        assert m["bf16"] and m["optimizer"] == 2 * m["gradients"] == 2 * m["ddp_buckets"], name  # AdamW, 2 workers
        assert 0 < m["activations_checkpointed"] < m["activations"] or name == "probe", name
        assert m["total"] == m["total_without_checkpointing"]
        assert b["margin_gib"] == pytest.approx(80 - m["total"] / GIB)
    assert bills["pretrain"]["memory"]["micro_batch"] == 16 and bills["coco"]["memory"]["micro_batch"] == 2
    # a probe trains its head alone and runs the frozen encoder without saving anything for backward
    probe, finetune = bills["probe"]["memory"], bills["finetune"]["memory"]
    assert probe["gradients"] < finetune["gradients"] / 5 and probe["activations"] < finetune["activations"] / 100
    assert probe["checkpointed_blocks"] == 0 and finetune["checkpointed_blocks"] == 5

    # between the pretraining stage's totals with and without checkpointing (the other stages left out)
    pretrain = bills["pretrain"]["memory"]
    between = float(f'{(pretrain["total_with_checkpointing"] + pretrain["total_without_checkpointing"]) / 2 / GIB:.4f}')
    tight = CliRunner().invoke(app, ["plan", config, "--gpu-mem", str(between), "--set", "stages={}"])
    assert tight.exit_code == 0, tight.output
    for column in ("micro-batch", "weights", "grads", "DDP buckets", "optimizer", "activations", "checkpointed",
                   "total checkpointed", f"on {between:g} GiB"):
        assert column in tight.output
    assert re.search(r"│ pretrain .* does not fit: \d+\.\d short; fits with", tight.output)
    fits = CliRunner().invoke(app, ["plan", config, "--gpu-mem", "80", "--set", "stages={}"])
    assert re.search(r"│ pretrain .* fits, 79\.\d spare", fits.output)


def test_the_plan_warns_when_the_cpus_cannot_decode_what_the_device_trains(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(small_config(tmp_path, cpus_per_worker=4)),
                                      "--throughput", "pretrain=2000", "--throughput", "finetune=500"])
    assert result.exit_code == 0, result.output
    # 64-px images: the 224-px figure of 373 img/s per core; 2000 / 373 + 1 = 6.4 cores
    assert re.search(r"warning: pretrain: at 2,000 img/s per device its data needs 6\.4 CPU cores per device \(5\.4 "
                     r"decoding at 373 img/s per core, the 224-px figure, .*cpus_per_worker is 4", result.output)
    assert "finetune: 2.3 CPU cores per device" in result.output and "warning: finetune" not in result.output


def test_the_swin_h_plan_gives_gib_with_and_without_checkpointing():
    """The paper's Swin-H on 80 GiB GPUs (its pretraining stage; every stage takes the same path)."""
    config = REPO_ROOT / "ray_configs" / "pipelines" / "paper_swin_huge_w14.yaml"
    result = CliRunner().invoke(app, ["plan", str(config), "--gpu-mem", "80", "--set", "stages={}"])
    assert result.exit_code == 0, result.output
    row = [line for line in result.output.splitlines() if line.startswith("│ pretrain")][-1]  # the memory table's
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    plain, checkpointed = float(cells[9]), float(cells[10])
    assert cells[1:3] == ["128", "bf16"] and 40 < plain < 80 and checkpointed < plain / 2
    assert cells[11].startswith("fits")


def test_sharding_divides_weights_gradients_and_states_among_the_workers():
    """FSDP's units are the outermost levels and blocks (a Swin level computes its blocks'
    position biases); a worker holds its share of everything plus the largest unit gathered."""
    from types import SimpleNamespace

    from mixmae_core.methods import create_pretraining_model
    from pipelines.worker_memory import ModelCosts
    from pipelines.stages.distributed import sharding_units

    with torch.device("meta"):
        model = create_pretraining_model("mixmae", "mixmae_swin_micro_w8", img_size=64)
    units = sharding_units(model)
    assert [type(u).__name__ for u in units] == ["SwinLevel"] * 4 + ["Block"] * 2  # 4 encoder levels, 2 decoder blocks
    activations = SimpleNamespace(at=lambda batch, checkpointing: 50.0, blocks=[])
    costs = ModelCosts(weights=800, trainable=800, activations=activations, bf16=False, largest_unit=100)
    ddp = costs.worker(8, 4, "adamw", fused=True, checkpointing=False)
    fsdp = costs.worker(8, 4, "adamw", fused=True, checkpointing=False, sharded=True)
    assert (ddp.weights, ddp.gradients, ddp.ddp_buckets, ddp.optimizer) == (800, 800, 800, 1600)
    assert (fsdp.weights, fsdp.gradients, fsdp.ddp_buckets, fsdp.optimizer) == (300, 300, 0, 400)
    assert fsdp.total() == 300 + 300 + 400 + 50 < ddp.total()


def test_the_plan_loads_neither_mlflow_nor_torchmetrics():
    """`mixmae plan` answers while a user waits: what it imports (its module and the stages' task
    modules, which build the models it prices) leaves out the libraries only a running stage uses."""
    code = ("import sys, pipelines.cli, pipelines.plan, pipelines.stages.classify, pipelines.stages.detect, "
            "pipelines.stages.segment\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'torchmetrics'))\n"
            "assert not bad, bad[:10]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_a_plan_keeps_its_prices_and_prices_again_what_changed(tmp_path, monkeypatch):
    """A second plan of the same models prices none and bills the same; another image size, or
    other code, is priced again."""
    from pipelines import plan

    monkeypatch.setenv("MIXMAE_CACHE_DIR", str(tmp_path / "cache"))
    priced, price_models = [], plan._price_models
    monkeypatch.setattr(plan, "_price_models", lambda config, first: priced.append(sorted(first.values()))
                        or price_models(config, first))
    config = load_config(small_config(tmp_path), ["stages={}"])
    first = plan.bill(config)
    assert len(list((tmp_path / "cache" / "plan").glob("*.json"))) == 1
    again = plan.bill(load_config(small_config(tmp_path), ["stages={}", "pretrain.epochs=3", "pretrain.batch_size=64"]))
    assert (again[0].memory.micro_batch, first[0].memory.micro_batch) == (32, 16)
    assert again[0].memory.activations > first[0].memory.activations
    assert again[0].train_flops_per_image == first[0].train_flops_per_image
    assert plan.bill(config) == first
    plan.bill(load_config(small_config(tmp_path), ["stages={}", "pretrain.img_size=128"]))
    monkeypatch.setattr(plan, "_code_version", lambda: "other code")
    plan.bill(config)
    assert priced == [["pretrain"], [], [], ["pretrain"], ["pretrain"]]


def test_a_process_that_has_run_autograd_still_gets_its_plan(tmp_path, monkeypatch):
    """torch refuses autograd in a fork of a process whose autograd has run a compiled graph: the
    models are then priced in the process itself, to the same bill (a notebook that trained
    something, a test session)."""
    from pipelines import plan

    config = load_config(small_config(tmp_path), ["stages={}"])
    monkeypatch.setenv("MIXMAE_CACHE_DIR", str(tmp_path / "before"))
    before = plan.bill(config)
    torch.compile(lambda x: (x * 2).sum(), backend="aot_eager")(torch.ones(2, requires_grad=True)).backward()
    monkeypatch.setenv("MIXMAE_CACHE_DIR", str(tmp_path / "after"))
    assert plan.bill(config) == before
