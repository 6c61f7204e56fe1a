"""Ray Tune sweeps recorded in MLflow, and the bill `mixmae plan` prints before a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import DEFAULT_CONFIG, REPO_ROOT
from pipelines.report import ReportRow, collect, mark_pareto
from pipelines.sweep import FLOPS_METRIC, PROBE_METRIC, load_sweep, run_sweep


def test_two_trial_sweep_is_recorded_and_resumable(tmp_path, ray_local, synthetic_data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "two-trials",
                "base": str(DEFAULT_CONFIG),
                "overrides": [
                    f"storage={tmp_path / 'runs'}", f"tracking.uri={uri}", "tracking.experiment=sweeps",
                    f"synthetic.root={Path(synthetic_data['pretrain']).parent}", "pretrain.max_steps=4",
                    "pretrain.scaling.num_workers=1", "pretrain.checkpoint_every_steps=4",
                ],
                "search": {"mask_ratio": {"grid": [0.25, 0.5]}, "epochs": {"grid": [2]}},
                "probe": {"stage": "inat2018", "epochs": 1},
                "storage": str(tmp_path / "tune"),
            }
        )
    )
    sweep, base = load_sweep(sweep_file)
    sweep_run_id, grid = run_sweep(sweep, base)
    assert len(grid) == 2 and not any(r.error for r in grid)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweeps").experiment_id
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep_run_id}'")
    assert sorted(t.data.params["mask_ratio"] for t in trials) == ["0.25", "0.5"]
    for trial in trials:
        assert trial.data.params["epochs"] == "2" and trial.data.tags["mixmae.kind"] == "pipeline"
        stages = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
        assert sorted(s.data.tags["mixmae.stage"] for s in stages) == ["pretrain", "probe"]
        pretrain = next(s for s in stages if s.data.tags["mixmae.stage"] == "pretrain")
        probe = next(s for s in stages if s.data.tags["mixmae.stage"] == "probe")
        assert probe.data.params["mode"] == "linear_probe"
        # the trial's two numbers are its stages' own: 4 steps of 16 images, and the probe's top-1
        assert trial.data.metrics[FLOPS_METRIC] == pretrain.data.metrics["flops/train_total"]
        assert trial.data.metrics[FLOPS_METRIC] == pytest.approx(4 * 16 * pretrain.data.metrics["flops/train_per_image"])
        assert trial.data.metrics[PROBE_METRIC] == probe.data.metrics["val/top1"]
    rows, label = collect(client, "sweeps")
    assert label == PROBE_METRIC and len(rows) == 2
    assert [r.accuracy for r in rows if r.pareto] == [max(r.accuracy for r in rows)]  # equal FLOPs: the better one
    # resuming a finished sweep reruns nothing and records no new trial
    _, again = run_sweep(sweep, base)
    assert len(again) == 2
    assert len(client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep_run_id}'")) == 2


def test_sweep_config_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "base": str(DEFAULT_CONFIG), "search": {"mask_ration": {"grid": [0.5]}},
                                    "probe": {"stage": "inat2018"}}))
    with pytest.raises(ValueError, match="unknown pretrain fields"):
        load_sweep(path)
    path.write_text(yaml.safe_dump({"name": "x", "base": str(DEFAULT_CONFIG), "search": {"mask_ratio": {"grid": [0.5]}},
                                    "probe": {"stage": "coco"}}))
    with pytest.raises(ValueError, match="must name a classification stage"):
        load_sweep(path)


def test_plan_matches_hand_checked_numbers():
    """single_gpu.yaml: Swin-B/W14 pretraining, 300 epochs of ImageNet-1K at batch 2048,
    then a 90-epoch linear probe on iNat2018 at batch 1024."""
    config = REPO_ROOT / "ray_configs" / "pipelines" / "single_gpu.yaml"
    result = CliRunner().invoke(app, ["plan", str(config), "--throughput", "pretrain=1520", "--tflops", "100", "--json"])
    assert result.exit_code == 0, result.output
    pretrain, probe = json.loads(result.output)
    # 1,281,167 images -> 640,583 pairs; 1,024 pairs per step -> 625 steps per epoch
    assert pretrain["steps"] == 300 * 625 == 187_500
    assert pretrain["images"] == 187_500 * 2048 == 384_000_000
    assert pretrain["gflops"] == pytest.approx(16.3, rel=0.01)
    assert pretrain["train_flops_per_image"] == pytest.approx(113.7e9, rel=0.01)
    assert pretrain["train_flops"] == pytest.approx(384e6 * pretrain["train_flops_per_image"])
    assert pretrain["device_hours"] == pytest.approx(384e6 / 1520 / 3600)  # 70.2 GPU-hours
    # 437,513 images / 1,024 -> 427 steps per epoch; frozen encoder: training ~ one forward
    assert probe["steps"] == 90 * 427
    assert probe["gflops"] == pytest.approx(pretrain["gflops"], rel=0.01)
    assert probe["train_flops_per_image"] == pytest.approx(2 * probe["gflops"] * 1e9)
    assert probe["device_hours"] == pytest.approx(probe["images"] * probe["train_flops_per_image"] / 100e12 / 3600)


def test_the_pareto_front_holds_exactly_the_runs_nothing_beats():
    rows = [
        ReportRow("a", "a", 1.0, 0.50, "", ""),
        ReportRow("b", "b", 2.0, 0.40, "", ""),  # costs more, scores less than a
        ReportRow("c", "c", 2.0, 0.70, "", ""),
        ReportRow("d", "d", 3.0, 0.70, "", ""),  # as good as c, for more
        ReportRow("e", "e", 4.0, 0.90, "", ""),
    ]
    mark_pareto(rows)
    assert [r.name for r in rows if r.pareto] == ["a", "c", "e"]
