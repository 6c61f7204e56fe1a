"""Ray Tune sweeps recorded in MLflow, and the bill `mixmae plan` prints before a run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import DEFAULT_CONFIG, REPO_ROOT
from pipelines.report import ReportRow, mark_pareto
from pipelines.sweep import FLOPS_METRIC, KNN_METRIC, PROBE_METRIC, load_sweep, trial_config
from pipelines.sweep_run import run_sweep
from tests.servers import BIN


CASES = [{"method": "mixmae", "model": "mixmae_swin_micro_w8"}, {"method": "simmim", "model": "mixmae_swin_micro_w8"}]
#: a trial whose data is missing (a dataset not mounted where it runs): the sweep records it as failed and goes on
UNMOUNTED = "/nonexistent/mixmae-sweep-data"
BAD_DATA = {"method": "mixmae", "model": "mixmae_swin_micro_w8", "data": {"layout": "imagefolder", "root": UNMOUNTED}}
#: 2 epochs of 5 steps on one worker, the monitor evaluating at every epoch: k-NN at steps 5 and 10
SHORT = ["pretrain.epochs=2", "pretrain.scaling.num_workers=1", "pretrain.eval_every_epochs=1",
         "pretrain.checkpoint_every_steps=5", "pretrain.reconstructions=0", "tracking.system_metrics=false"]


def _write_sweep(path: Path, tmp_path: Path, synthetic_data: dict, extra: tuple = (), **fields) -> Path:
    overrides = [f"storage={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "tracking.experiment=sweeps", f"synthetic.root={Path(synthetic_data['pretrain']).parent}", *SHORT, *extra]
    path.write_text(yaml.safe_dump({"base": str(DEFAULT_CONFIG), "overrides": overrides, "probe": {"stage": "inat2018", "epochs": 1},
                                    "storage": str(tmp_path / "tune"), **fields}))
    return path


def test_a_methods_sweep_over_seeds_is_named_paired_reported_and_resumable(tmp_path, ray_local, synthetic_data, s3):
    """`mixmae sweep` of two methods x two seeds (and a trial whose data is missing), as a user
    runs it with its output in a file, Tune's state and the trials' checkpoints in a bucket
    (moto's S3 server): one line per event; 4 pipeline runs named by their settings, each with a
    k-NN curve; `mixmae report --json` pairs the methods by seed; the same command again
    restores the sweep from the bucket and retries only the failed trials."""
    bucket = s3.bucket("sweep")
    sweep_file = _write_sweep(tmp_path / "sweep.yaml", tmp_path, synthetic_data, extra=[f"storage=s3://{bucket}/runs"],
                              name="methods", seeds=[0, 1], search={"recipe": {"cases": [*CASES, BAD_DATA]}},
                              max_concurrent_trials=2, storage=f"s3://{bucket}/tune")
    env = {**os.environ, **s3.env, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    sweep = subprocess.run([str(BIN / "mixmae"), "sweep", str(sweep_file)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=1200)
    assert sweep.returncode == 1, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    lines = sweep.stdout.splitlines()
    assert len(lines) < 100, sweep.stdout
    assert "2 of 6 trial(s) failed" in sweep.stdout and "Traceback" not in sweep.stdout + sweep.stderr
    for seed in (0, 1):
        name = f"methods-mixmae-swin_micro_w8-s{seed}"
        assert any(f"{name}: started, method mixmae, model mixmae_swin_micro_w8, seed {seed}" in l for l in lines)
        assert any(f"{name}: pretraining step 5, k-NN top-1" in l for l in lines)
        assert any(f"{name}: finished: pretraining" in l and "probe top-1" in l for l in lines)
    failed = [l for l in lines if ": failed: " in l]
    assert len(failed) == 2 and all(f"stage pretrain: data root {UNMOUNTED} does not exist" in l for l in failed)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweeps").experiment_id
    (sweep_run,) = client.search_runs([experiment], "tags.`mixmae.kind` = 'sweep'")
    assert sweep_run.info.status == "FAILED" and sweep_run.data.tags["mixmae.failed_trials"] == "2"
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")
    unmounted = [t for t in trials if t.data.params.get("pretrain.data.root") == UNMOUNTED]
    assert len(unmounted) == 2 and all(t.info.status == "FAILED" for t in unmounted)
    trials = [t for t in trials if t not in unmounted]
    assert sorted(t.info.run_name for t in trials) == [f"methods-{m}-swin_micro_w8-s{s}" for m in ("mixmae", "simmim") for s in (0, 1)]
    for trial in trials:
        params = trial.data.params
        method, seed = params["method"], int(params["seed"])
        assert (params["encoder"], params["sweep"], params["trial"]) == ("mixmae_swin_micro_w8", "methods",
                                                                         f"methods-{method}-swin_micro_w8")
        assert params["pretrain.seed"] == params["stages.probe.seed"] == str(seed)
        stages = {s.data.tags["mixmae.stage"]: s for s in
                  client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")}
        assert sorted(stages) == ["pretrain", "probe"]
        for stage in stages.values():  # every stage says which method trained its encoder, and which encoder
            assert (stage.data.tags["method"], stage.data.tags["encoder"]) == (method, "mixmae_swin_micro_w8")
        pretrain, probe = stages["pretrain"], stages["probe"]
        assert probe.data.params["mode"] == "linear_probe"
        knn = client.get_metric_history(pretrain.info.run_id, "eval/knn_top1")
        flops = {m.step: m.value for m in client.get_metric_history(pretrain.info.run_id, "flops/train_total")}
        assert [m.step for m in knn] == [5, 10] and all(m.step in flops for m in knn)
        assert trial.data.metrics[FLOPS_METRIC] == flops[10] == pytest.approx(10 * 16 * pretrain.data.metrics["flops/train_per_image"])
        assert trial.data.metrics[KNN_METRIC] == knn[-1].value
        assert trial.data.metrics[PROBE_METRIC] == probe.data.metrics["val/top1"]
        assert trial.data.metrics["probe.data_val_images"] == 30  # 5 classes x 6 stand-in validation images
        for stage in stages.values():
            assert stage.data.tags["mixmae.checkpoint"].startswith(f"s3://{bucket}/runs/")
        assert probe.data.tags["init"] == pretrain.data.tags["mixmae.encoder_checkpoint"]  # its workers read it from the bucket
        # one worker group trained both stages (the probe's scaling is the pretraining's)
        trainers = {key.split("/")[1] for key in s3.keys(bucket, f"runs/{trial.info.run_id}-")}
        assert f"{trial.info.run_id}-pretrain+probe" in trainers and not trainers & {
            f"{trial.info.run_id}-pretrain", f"{trial.info.run_id}-probe"}, trainers
    assert s3.keys(bucket, "tune/methods/") and not (tmp_path / "runs").exists() and not (tmp_path / "tune").exists()
    # runs with one seed trained on the same images, whatever the method
    fingerprints = {}
    for trial in trials:
        (pretrain,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}' and tags.`mixmae.stage` = 'pretrain'")
        history = [m.value for m in client.get_metric_history(pretrain.info.run_id, "data/fingerprint")]
        fingerprints.setdefault(trial.data.params["seed"], set()).add(tuple(history))
    assert all(len(histories) == 1 for histories in fingerprints.values()) and len(fingerprints) == 2

    report = subprocess.run([str(BIN / "mixmae"), "report", "sweeps", "--json", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--out", str(tmp_path / "report")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    result = json.loads(report.stdout)
    groups = {g["method"]: g for g in result["groups"]}
    for method in ("mixmae", "simmim"):
        assert groups[method]["n_seeds"] == 2 and groups[method]["t95_low"] <= groups[method]["mean"] <= groups[method]["t95_high"]
    (comparison,) = result["comparisons"]
    assert {comparison["first"], comparison["second"]} == {"mixmae", "simmim"} and comparison["n_seeds"] == 2
    assert comparison["verdict"] in ("within noise", "mixmae above simmim", "simmim above mixmae")

    # the same command again retries only the failed trials: the finished ones are neither rerun nor recorded again
    ended = {t.info.run_id: t.info.end_time for t in trials}
    again = subprocess.run([str(BIN / "mixmae"), "sweep", str(sweep_file)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 1 and "2 of 6 trial(s) failed" in again.stdout, again.stdout[-3000:]
    after = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")
    assert len(after) == 6 and {t.info.run_id: t.info.end_time for t in after if t.info.run_id in ended} == ended
    assert all(client.get_run(t.info.run_id).info.end_time > t.info.end_time for t in unmounted)


def test_asha_on_a_mask_ratio_grid_stops_trials_by_knn_accuracy(tmp_path, ray_local, synthetic_data):
    """ASHA (grace 1 evaluation, halving) on three mask ratios, one trial at a time: at the
    first evaluation a trial goes on only if its eval/knn_top1 is in the top half of those
    seen there; a trial stopped early runs no probe."""
    # no warm-up and a high rate, so five steps move the encoders apart; the nearest neighbour
    # alone votes, so small moves show in the accuracy
    sweep_file = _write_sweep(tmp_path / "asha.yaml", tmp_path, synthetic_data, name="asha", seeds=[0],
                              search={"mask_ratio": {"grid": [0.25, 0.5, 0.75]}}, scheduler={"type": "asha"},
                              extra=["pretrain.warmup_epochs=0", "pretrain.base_lr=0.02", "pretrain.monitor.k=1"])
    sweep, base = load_sweep(sweep_file)
    _, grid = run_sweep(sweep, base)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweeps").experiment_id
    first_evaluations, stopped = [], []
    for result in sorted(grid, key=lambda r: r.config["mask_ratio"]):  # the grid's order is the order they ran
        name = f"asha-mask_ratio{result.config['mask_ratio']}-s0"
        (pretrain,) = client.search_runs([experiment], f"tags.`mixmae.stage` = 'pretrain' and attributes.run_name = 'pretrain' "
                                                       f"and tags.`mlflow.parentRunId` = '{_run_id(client, experiment, name)}'")
        knn = client.get_metric_history(pretrain.info.run_id, "eval/knn_top1")
        value = knn[0].value
        # ASHA's rule at its first rung, mode max, reduction factor 2: below the median of the earlier trials' stops
        expected_stop = bool(first_evaluations) and value < float(np.nanpercentile(first_evaluations, 50))
        first_evaluations.append(value)
        stopped.append(PROBE_METRIC not in result.metrics)
        assert stopped[-1] == expected_stop, (name, first_evaluations)
        assert len(knn) == (1 if stopped[-1] else 2)
    assert any(stopped), f"no trial was stopped: first k-NN accuracies {first_evaluations}"


def _run_id(client: MlflowClient, experiment: str, name: str) -> str:
    (run,) = client.search_runs([experiment], f"attributes.run_name = '{name}'")
    return run.info.run_id


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


def test_a_trials_probe_trains_in_its_pretrainings_worker_group_when_their_scaling_agrees(tmp_path):
    """One Ray Train group start a trial where the probe's scaling is the pretraining's; a probe
    on other workers keeps its own group."""
    for pretrain_workers, groups in ((1, [["pretrain", "probe"]]), (2, [])):
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump({"name": "x", "base": str(DEFAULT_CONFIG), "probe": {"stage": "inat2018"},
                                        "search": {"mask_ratio": {"grid": [0.5]}},
                                        "overrides": [f"pretrain.scaling.num_workers={pretrain_workers}"]}))
        sweep, base = load_sweep(path)
        trial = trial_config(base, sweep, {"mask_ratio": 0.5}, seed=1)
        assert trial.stage_groups == groups and list(trial.stages) == ["probe"]
        assert [names for _, names in trial.worker_groups(["pretrain", "probe"])] == (groups or [["pretrain"], ["probe"]])


def test_plan_matches_hand_checked_numbers():
    """single_gpu.yaml: Swin-B/W14 pretraining, 300 epochs of ImageNet-1K at batch 2048,
    then a 90-epoch linear probe on iNat2018 at batch 1024."""
    config = REPO_ROOT / "ray_configs" / "pipelines" / "single_gpu.yaml"
    result = CliRunner().invoke(app, ["plan", str(config), "--throughput", "pretrain=1520", "--tflops", "100", "--json"])
    assert result.exit_code == 0, result.output
    pretrain, probe = json.loads(result.stdout)
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
