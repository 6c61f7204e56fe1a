"""The README's cluster path, as written: `ray start --head` from the project's environment,
an MLflow tracking server, `ray job submit --working-dir . --runtime-env ... -- mixmae run
ray_configs/pipelines/smoke.yaml`. Only what this test starts is stopped afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from mlflow.tracking import MlflowClient

import mixmae_core  # noqa: F401  (registers the encoders)
from mixmae_core.checkpoint import load_state_dict
from pipelines.config import REPO_ROOT
from tests.servers import BIN

pytestmark = pytest.mark.cluster


FEATURES_IN_A_FRESH_PROCESS = """
import sys, numpy as np, mlflow
mlflow.set_tracking_uri(sys.argv[1])
images = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
np.save(sys.argv[3], np.asarray(mlflow.pyfunc.load_model(sys.argv[2]).predict(images)))
"""


def test_smoke_config_submitted_as_a_ray_job_records_to_the_tracking_server(tmp_path, ray_head, mlflow_server):
    address, env = ray_head
    runtime_env = yaml.safe_load((REPO_ROOT / "ray_configs/cluster/runtime_env.yaml").read_text())
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env", str(tmp_path / "runtime_env.yaml"), "--", "mixmae", "run", "ray_configs/pipelines/smoke.yaml"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout, submit.stdout[-3000:]
    # the job's console is the pipeline's events; Ray's and the libraries' chatter is in the log file
    assert "TrainingReport" not in submit.stdout and "PYTHON worker processes" not in submit.stdout
    # nothing of the workers' reaches the console after the summary (their last lines go to the log file too)
    assert "UserWarning" not in submit.stdout and "mlflow.pyfunc" not in submit.stdout
    assert "pretrain: finished" in submit.stdout and "probe: finished" in submit.stdout, submit.stdout[-3000:]

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("mixmae-smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    runs = client.search_runs([experiment.experiment_id])
    pipeline = next(r for r in runs if r.data.tags.get("mixmae.kind") == "pipeline")
    stages = {r.data.tags["mixmae.stage"]: r for r in runs if "mixmae.stage" in r.data.tags}
    assert pipeline.info.status == "FINISHED" and set(stages) == {"pretrain", "probe"}
    assert all(r.data.tags["mlflow.parentRunId"] == pipeline.info.run_id for r in stages.values())
    pretrain = stages["pretrain"]
    assert [m.step for m in client.get_metric_history(pretrain.info.run_id, "train/loss")] == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id, "checkpoint")}
    assert "checkpoint/encoder.safetensors" in artifacts

    for name, run in stages.items():
        inputs = {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"]): i.dataset
                  for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
        contexts = {"pretrain": {"training"}, "probe": {"training", "evaluation"}}[name]
        assert {context for _, context in inputs} == contexts, (name, inputs)
        for dataset in inputs.values():
            profile = json.loads(dataset.profile)
            assert profile["images"] > 0 and profile["skipped"] == 0 and len(dataset.digest) > 0
        assert any(key.startswith("system/cpu_utilization") for key in client.get_run(run.info.run_id).data.metrics)

    # the pretrained encoder as an MLflow model, loaded where nothing of the run is imported,
    # gives the features of the safetensors checkpoint
    model_uri = pretrain.data.tags["mixmae.model_uri"]
    subprocess.run([sys.executable, "-c", FEATURES_IN_A_FRESH_PROCESS, mlflow_server.uri, model_uri,
                    str(tmp_path / "features.npy")], check=True, timeout=300)
    weights = client.download_artifacts(pretrain.info.run_id, "checkpoint/encoder.safetensors", str(tmp_path))
    encoder = timm.create_model("mixmae_swin_micro_w8", num_classes=0, img_size=64).eval()
    encoder.load_state_dict(load_state_dict(weights))
    images = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        expected = encoder.forward_head(encoder.forward_features(images), pre_logits=True).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "features.npy"), expected, rtol=1e-5, atol=1e-5)
    assert "mixmae.model_uri" in stages["probe"].data.tags
    # the probe trained in the pretraining's worker group, from the encoder its final checkpoint holds
    probe = stages["probe"]
    assert probe.data.tags["init"] == pretrain.data.tags["mixmae.encoder_checkpoint"]
    trainers = {Path(run.data.tags["mixmae.checkpoint"]).parent for run in (pretrain, probe)}
    assert len(trainers) == 1 and trainers.pop().name == f"{pipeline.info.run_id}-pretrain+probe"
