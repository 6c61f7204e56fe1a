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
from pipelines.sweep import FLOPS_METRIC, PROBE_METRIC, load_sweep, run_sweep, trial_error
from pipelines.tracking import FAILED_REASON


CASES = [
    {"method": "mixmae", "model": "mixmae_swin_micro_w8"},
    {"method": "simmim", "model": "mixmae_pvt_v2_micro"},
    {"method": "mae", "model": "mae_vit_micro_p8"},
]


#: a trial whose data is missing (a dataset not mounted where it runs): the sweep records it as failed and goes on
UNMOUNTED = "/nonexistent/mixmae-sweep-data"
BAD_DATA = {"method": "mixmae", "model": "mixmae_swin_micro_w8", "data": {"layout": "imagefolder", "root": UNMOUNTED}}


def test_a_methods_sweep_is_recorded_by_method_and_encoder_and_resumable(tmp_path, ray_local, synthetic_data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "methods",
                "base": str(DEFAULT_CONFIG),
                "overrides": [
                    f"storage={tmp_path / 'runs'}", f"tracking.uri={uri}", "tracking.experiment=sweeps",
                    f"synthetic.root={Path(synthetic_data['pretrain']).parent}", "pretrain.max_steps=2",
                    "pretrain.scaling.num_workers=1", "pretrain.checkpoint_every_steps=2",
                ],
                "search": {"recipe": {"cases": [*CASES, BAD_DATA]}},
                "probe": {"stage": "inat2018", "epochs": 1},
                "storage": str(tmp_path / "tune"),
                "max_concurrent_trials": 2,
            }
        )
    )
    sweep, base = load_sweep(sweep_file)
    sweep_run_id, grid = run_sweep(sweep, base)
    # the trial without data fails, is recorded as failed, and the others run to the end
    (failed,) = [r for r in grid if r.error]
    assert failed.config["recipe"] == BAD_DATA
    assert trial_error(failed) == f"stage pretrain: data root {UNMOUNTED} does not exist"
    assert len(grid) == 4 and all(r.metrics.get(PROBE_METRIC) is not None for r in grid if not r.error)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweeps").experiment_id
    sweep_run = client.get_run(sweep_run_id)
    assert sweep_run.info.status == "FAILED" and sweep_run.data.tags["mixmae.failed_trials"] == "1"
    all_trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep_run_id}'")
    (unmounted,) = [t for t in all_trials if t.data.params.get("pretrain.data.root") == UNMOUNTED]
    assert unmounted.info.status == "FAILED"
    (unmounted_stage,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{unmounted.info.run_id}'")
    assert unmounted_stage.info.status == "FAILED" and UNMOUNTED in unmounted_stage.data.tags[FAILED_REASON]
    trials = [t for t in all_trials if t.info.run_id != unmounted.info.run_id]
    assert sorted((t.data.params["method"], t.data.params["model"]) for t in trials) == sorted(
        (c["method"], c["model"]) for c in CASES
    )
    for trial in trials:
        method, model = trial.data.params["method"], trial.data.params["model"]
        assert trial.data.tags["mixmae.kind"] == "pipeline" and trial.data.tags["method"] == method
        stages = {s.data.tags["mixmae.stage"]: s for s in
                  client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")}
        assert sorted(stages) == ["pretrain", "probe"]
        for stage in stages.values():  # every stage says which method trained its encoder, and which encoder
            assert (stage.data.tags["method"], stage.data.tags["encoder"]) == (method, model)
            assert (stage.data.params["method"], stage.data.params["encoder"]) == (method, model)
        pretrain, probe = stages["pretrain"], stages["probe"]
        assert probe.data.params["mode"] == "linear_probe"
        # the trial's two numbers are its stages' own: 2 steps of 16 images, and the probe's top-1
        assert trial.data.metrics[FLOPS_METRIC] == pretrain.data.metrics["flops/train_total"]
        assert trial.data.metrics[FLOPS_METRIC] == pytest.approx(2 * 16 * pretrain.data.metrics["flops/train_per_image"])
        assert trial.data.metrics[PROBE_METRIC] == probe.data.metrics["val/top1"]
        assert trial.data.metrics["probe.data_val_images"] == 30  # 5 classes x 6 stand-in validation images
    rows, label = collect(client, "sweeps")
    assert label == PROBE_METRIC and sorted(r.method for r in rows) == ["mae", "mixmae", "simmim"]
    assert all(r.pareto for r in rows)  # one run per method: each is its method's front
    assert all(r.interval()[0] < r.accuracy < r.interval()[1] for r in rows if 0 < r.accuracy < 1)
    # rerunning the sweep retries only the failed trial: the finished ones are neither rerun nor recorded again
    ended = {t.info.run_id: t.info.end_time for t in trials}
    _, again = run_sweep(sweep, base)
    assert len(again) == 4 and [r.config["recipe"] for r in again if r.error] == [BAD_DATA]
    after = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep_run_id}'")
    assert len(after) == 4 and {t.info.run_id: t.info.end_time for t in after if t.info.run_id in ended} == ended
    assert client.get_run(unmounted.info.run_id).info.end_time > unmounted.info.end_time


def test_the_interval_is_wilsons_from_the_validation_count():
    row = ReportRow("r", "r", 1.0, 0.5, "", "", val_images=100)
    low, high = row.interval()
    assert (round(low, 3), round(high, 3)) == (0.404, 0.596)
    assert ReportRow("r", "r", 1.0, 1.0, "", "", val_images=30).interval()[0] == pytest.approx(0.886, abs=1e-3)
    assert ReportRow("r", "r", 1.0, 0.7, "", "").interval() == (0.7, 0.7)  # count unknown: no interval


def test_sweep_config_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "base": str(DEFAULT_CONFIG), "search": {"mask_ration": {"grid": [0.5]}},
                                    "probe": {"stage": "inat2018"}}))
    with pytest.raises(ValueError, match="unknown pretrain fields"):
        load_sweep(path)
    path.write_text(yaml.safe_dump({"name": "x", "base": str(DEFAULT_CONFIG), "probe": {"stage": "inat2018"},
                                    "search": {"recipe": {"cases": [{"method": "mae", "modle": "mae_vit_micro_p8"}]}}}))
    with pytest.raises(ValueError, match=r"unknown pretrain fields \['modle'\]"):
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
