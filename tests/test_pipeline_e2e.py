"""The quickstart pipeline end to end: pretraining and all transfer stages, nested MLflow
runs, learning on every task, the report over it. One run serves every test here: it is
first stopped after pretraining (as an interrupted pipeline would be) and then continued."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from mixmae_core.checkpoint import load_encoder_weights, load_state_dict
from pipelines.cli import app
from pipelines.config import DEFAULT_CONFIG, load_config
from pipelines.pipeline import run_pipeline
from pipelines.tracking import COMPLETE, ENCODER, STAGE
from tests.servers import actors

# The fixture runs the whole quickstart (about a quarter of an hour on 2 cores) inside the
# first test's time limit.
pytestmark = pytest.mark.timeout(2400)

CLASS_COUNTS = {"inat2018": 5, "inat2019": 4, "places205": 4, "places365": 5}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, ray_local, synthetic_data):
    work = tmp_path_factory.mktemp("quickstart")
    config = load_config(
        DEFAULT_CONFIG,
        [
            f"storage={work / 'runs'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            f"synthetic.root={Path(synthetic_data['pretrain']).parent}",
        ],
    )
    first = run_pipeline(config, stages=["pretrain"])
    outcome = run_pipeline(config)
    client = MlflowClient(outcome.tracking_uri)
    runs = {r.data.tags.get(STAGE): r for r in client.search_runs([outcome.experiment_id]) if r.data.tags.get(STAGE)}
    return config, outcome, client, runs, work, first


def _history(client, run, key):
    return [m.value for m in client.get_metric_history(run.info.run_id, key)]


def test_a_pipeline_stopped_between_stages_continues_where_it_stopped(quickstart):
    _, outcome, _, runs, _, first = quickstart
    assert first.run_id == outcome.run_id
    done = {s.name: s for s in outcome.stages}
    assert done["pretrain"].skipped and done["pretrain"].run_id == runs["pretrain"].info.run_id
    assert not any(s.skipped for n, s in done.items() if n != "pretrain")


def test_every_stage_ran_as_a_nested_run(quickstart):
    config, outcome, client, runs, work, _ = quickstart
    assert list(config.all_stages()) == ["pretrain", "inat2018", "inat2019", "places205", "places365", "coco", "ade20k"]
    assert set(runs) == set(config.all_stages())
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mixmae.kind"] == "pipeline"
    for name, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags[COMPLETE] == "true", name
        assert run.data.tags["mlflow.parentRunId"] == outcome.run_id
        assert run.data.metrics["flops/train_per_image"] > 0 and run.data.metrics["time/wall_s"] > 0
        assert (run.data.tags["method"], run.data.tags["encoder"]) == ("mixmae", "mixmae_swin_micro_w8"), name
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # pretraining and the two worker groups of transfer stages: three Ray Train runs
    trainers = {p.name.removeprefix(f"{outcome.run_id}-") for p in (work / "runs").glob(f"{outcome.run_id}-*")}
    assert trainers == {"pretrain", *("+".join(group) for group in config.stage_groups)}, trainers
    assert sorted(n for group in config.stage_groups for n in group) == sorted(config.stages)
    # one skip counter actor per pipeline call (stopped after pretraining, then continued), not per stage
    counters = actors("SkipCounter")
    assert sum(outcome.run_id in (actor.name or "") for actor in counters) == 2
    # the transfer stages started from the pretraining stage's encoder
    encoder = runs["pretrain"].data.tags[ENCODER]
    assert all(runs[n].data.tags["init"] == encoder for n in config.stages)
    # summary metrics on the pipeline run, one headline per stage
    summary = parent.data.metrics
    assert {"pretrain.flops_train_total", "inat2018.val_top1", "coco.val_bbox_AP", "ade20k.val_mIoU"} <= set(summary)


def test_pretraining_on_two_workers_learns_and_exports_a_timm_encoder(quickstart):
    config, _, client, runs, *_ = quickstart
    run = runs["pretrain"]
    assert run.data.params["scaling.num_workers"] == "2" and run.data.params["mask_ratio"] == "0.5"
    assert {k: run.data.tags[k] for k in ("model", "mask_ratio", "epochs", "workers", "device")} == {
        "model": "mixmae_swin_micro_w8", "mask_ratio": "0.5", "epochs": "10.0", "workers": "2", "device": "cpu"}
    losses = _history(client, run, "train/loss")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    every = config.pretrain.log_every_steps
    assert steps == list(range(every, steps[-1] + 1, every)) and steps[-1] == 50  # 40 pairs / 8 per step x 10 epochs
    # predicting each patch's mean scores (n-1)/n on norm-pix targets (n = 32*32*3 values);
    # the quickstart's 50 steps reach about 0.96 (0.958-0.960 over three runs)
    mean_patch_loss = (32 * 32 * 3 - 1) / (32 * 32 * 3)
    assert losses[-1] < 0.98 * mean_patch_loss < losses[0], losses
    # the k-NN monitor scored the encoder every 5 epochs and at the end, at known pretraining FLOPs
    knn = client.get_metric_history(run.info.run_id, "eval/knn_top1")
    flops = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "flops/train_total")}
    assert [m.step for m in knn] == [25, 50] and all(0 <= m.value <= 1 for m in knn)
    assert all(flops[m.step] == m.step * 16 * run.data.metrics["flops/train_per_image"] for m in knn)
    assert run.data.metrics["eval/knn_images"] == 24  # the stand-in's validation split
    for key in ("train/lr", "train/images_per_s", "train/grad_norm", "train/data_wait_frac", "flops/train_total",
                "time/device_hours", "flops/encoder_gmacs", "flops/train_per_image", "data/images_attempted"):
        assert key in run.data.metrics, key
    artifacts = {a.path for d in ("checkpoint", "pictures") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"checkpoint/encoder.safetensors", "checkpoint/model.safetensors", "checkpoint/trainer_state.pt"} <= artifacts
    assert any(p.startswith("pictures/reconstruction") for p in artifacts)
    classifier = timm.create_model("mixmae_swin_micro_w8", num_classes=3)
    load_encoder_weights(classifier, run.data.tags[ENCODER])
    weights = load_state_dict(run.data.tags[ENCODER])
    assert torch.equal(classifier.layers[3].blocks[0].mlp.fc2.weight, weights["layers.3.blocks.0.mlp.fc2.weight"])


def test_the_knn_monitor_scores_the_same_on_one_worker_as_on_two(quickstart, synthetic_data):
    """The pretraining's last k-NN accuracy, computed by its 2 workers each on its slice of the
    monitor's splits, equals one process scoring the exported encoder on all of them."""
    from mixmae_core.tasks.knn import knn_predict, pooled_features
    from pipelines.data.collate import normalize_on_device
    from pipelines.data.datasets import classification_dataset
    from pipelines.data.manifest import build_manifest

    config, _, client, runs, work, _ = quickstart
    run = runs["pretrain"]
    encoder = timm.create_model(config.pretrain.model, num_classes=0, img_size=64).eval()
    load_encoder_weights(encoder, run.data.tags[ENCODER])
    table = build_manifest("imagefolder", synthetic_data["pretrain"])

    def features(split):
        rows = classification_dataset(table_source(table, work), split=split, img_size=64, train=False,
                                      crop_pct=config.pretrain.monitor.crop_pct, auto_augment=None).take_all()
        images = torch.from_numpy(np.stack([r["image"] for r in rows]))
        return pooled_features(encoder, normalize_on_device(images)), torch.tensor([r["label"] for r in rows])

    (memory, memory_labels), (queries, labels) = features("train"), features("val")
    scores = knn_predict(memory, memory_labels, queries, 4, k=20, temperature=0.07)
    expected = (scores.argmax(1) == labels).float().mean().item()
    assert client.get_metric_history(run.info.run_id, "eval/knn_top1")[-1].value == pytest.approx(expected, abs=1e-6)


def table_source(table, work: Path):
    from pipelines.data.manifest import open_source, write_manifest

    return open_source(write_manifest(table, work / "knn_check.parquet"))


@pytest.mark.parametrize("stage", sorted(CLASS_COUNTS))
def test_classification_stages_beat_chance(quickstart, stage):
    run = quickstart[3][stage]
    chance = 1 / CLASS_COUNTS[stage]
    assert run.data.metrics["val/top1"] > chance + 0.15, (stage, run.data.metrics["val/top1"])


def test_detection_finds_objects(quickstart):
    _, _, client, runs, *_ = quickstart
    metrics = runs["coco"].data.metrics
    assert metrics["val/bbox_AP"] > 0 and metrics["val/segm_AP"] > 0, metrics
    pictures = [a.path for a in client.list_artifacts(runs["coco"].info.run_id, "pictures")]
    assert pictures and all(p.endswith(".png") for p in pictures)


def _all_background_miou(ade_root: Path) -> float:
    """mIoU of predicting the background everywhere: its IoU is the background's share of
    the labelled pixels, every other class present scores 0."""
    labels = np.concatenate(
        [np.asarray(Image.open(p)).ravel() for p in (ade_root / "ADEChallengeData2016/annotations/validation").glob("*.png")]
    )
    labelled = labels[labels > 0]  # 0 is ignored
    return float((labelled == 1).mean()) / len(np.unique(labelled))


def test_segmentation_beats_the_all_background_baseline(quickstart, synthetic_data):
    _, _, client, runs, work, _ = quickstart
    metrics = runs["ade20k"].data.metrics
    baseline = _all_background_miou(Path(synthetic_data["ade20k"]))
    assert 0.1 < baseline < 0.3
    assert metrics["val/mIoU"] > baseline + 0.05, (metrics, baseline)
    path = Path(client.download_artifacts(runs["ade20k"].info.run_id, "pictures", str(work / "seg")))
    with Image.open(next(path.glob("*.png"))) as picture:
        assert picture.width == 3 * picture.height  # image | prediction | target


def _official_fine_tuned(classifier: dict) -> dict:
    """A classifier state dict as the official main_finetune.py saves it: patch merging
    numbered with the level before it, the position table as ``(1, h*w, C)``, in ``model``."""
    state = {}
    for key, value in classifier.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        state[key] = value.flatten(0, 1)[None] if key == "absolute_pos_embed" else value
    return {"model": state, "epoch": 99}


def test_eval_scores_a_stage_checkpoint_and_its_official_conversion_as_the_stage_did(
    quickstart, tmp_path, synthetic_data, ray_local
):
    config, outcome, client, runs, work, _ = quickstart
    cluster = ray_local.get_runtime_context().gcs_address
    stage = runs["inat2018"]
    settings = ["--set", f"storage={work / 'runs'}", "--set", f"tracking.uri={outcome.tracking_uri}",
                "--set", f"synthetic.root={Path(synthetic_data['pretrain']).parent}"]
    checkpoint = stage.data.tags[ENCODER]
    official = tmp_path / "checkpoint-99.pth"
    torch.save(_official_fine_tuned(load_state_dict(checkpoint)), official)
    converted = tmp_path / "official.safetensors"
    assert CliRunner().invoke(app, ["convert", str(official), str(converted)]).exit_code == 0
    ours, back = load_state_dict(checkpoint), load_state_dict(converted)  # the conversion scores as the stage does
    assert ours.keys() == back.keys() and all(torch.equal(ours[key], back[key]) for key in ours)
    result = CliRunner().invoke(app, ["eval", checkpoint, "--config", str(DEFAULT_CONFIG), "--stage", "inat2018", *settings])
    assert result.exit_code == 0, result.output
    # a command ends the Ray session it started, never its caller's (here the test session's, with its S3 keys)
    assert ray_local.is_initialized() and ray_local.get_runtime_context().gcs_address == cluster
    (run,) = client.search_runs([outcome.experiment_id], f"tags.`mixmae.kind` = 'eval' and attributes.run_name = "
                                                         f"'eval-inat2018-{Path(checkpoint).stem}'")
    scored = run.data.metrics
    assert scored["val/top1"] == stage.data.metrics["val/top1"] and scored["data/val_images"] == 30
    assert scored["val/top1_ci95_low"] < scored["val/top1"] < scored["val/top1_ci95_high"]
    assert run.data.params["checkpoint_kind"] == "classifier" and "val/top1" in result.output
    pretrained = runs["pretrain"].data.tags[ENCODER]  # an encoder has no head: nothing to score
    result = CliRunner().invoke(app, ["eval", pretrained, "--config", str(DEFAULT_CONFIG), "--stage", "inat2018", *settings])
    assert result.exit_code == 1 and "without a classification head" in result.output


def test_rerunning_a_finished_pipeline_skips_every_stage(quickstart):
    config, outcome, *_ = quickstart
    again = run_pipeline(config)
    assert again.run_id == outcome.run_id and all(s.skipped for s in again.stages)


def test_report_plots_accuracy_against_pretraining_flops(quickstart, tmp_path):
    config, outcome, client, *_ = quickstart
    result = CliRunner().invoke(
        app,
        ["report", config.tracking.experiment, "--tracking-uri", outcome.tracking_uri, "--out", str(tmp_path),
         "--metric", "inat2018.val_top1"],
    )
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "flops_vs_accuracy.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].endswith("True")  # one pipeline run: on the front by itself
    with Image.open(tmp_path / "flops_vs_accuracy.png") as plot:
        assert plot.width > 300
    reports = client.search_runs([outcome.experiment_id], "tags.`mixmae.kind` = 'report'")
    assert {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")} == {
        f"report/{name}" for name in ("flops_vs_accuracy.csv", "flops_vs_accuracy.png", "seed_groups.csv",
                                      "paired_comparisons.csv", "flops_budgets.csv", "report.md")
    }
