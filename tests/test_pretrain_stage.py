"""Failures inside the pretraining stage: a killed worker, a stopped driver, divergence.
(A clean pretraining run is checked in test_pipeline_e2e.py, a tracking server in test_cluster_job.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import PipelineConfig
from pipelines.pipeline import run_pipeline
from pipelines.stages.jobs import StageError
from pipelines.tracking import COMPLETE, FAILED_REASON

pytestmark = pytest.mark.usefixtures("ray_local")


def make_config(tmp_path: Path, synthetic_data: dict, uri: str | None = None, name: str = "t", **pretrain) -> PipelineConfig:
    base = dict(
        model="mixmae_swin_micro_w8",
        img_size=64,
        data={"layout": "imagefolder", "root": "synthetic:pretrain"},
        epochs=8,
        batch_size=16,
        base_lr=2e-3,
        warmup_epochs=1,
        log_every_steps=2,
        checkpoint_every_steps=8,
        reconstructions=2,
        scaling={"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1},
    )
    base.update(pretrain)
    return PipelineConfig.model_validate(
        {
            "name": name,
            "storage": str(tmp_path / "runs"),
            "tracking": {"uri": uri or f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
            "synthetic": {"root": str(Path(synthetic_data["pretrain"]).parent)},
            "pretrain": base,
        }
    )


def _stage_run(client: MlflowClient, outcome):
    return client.get_run(outcome.stages[0].run_id)


def _steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def _kill_a_worker_after(client: MlflowClient, experiment: str, step: int, done: threading.Event, killed: list):
    from ray.util.state import list_actors

    deadline = time.time() + 300
    while time.time() < deadline and not done.is_set():
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], "tags.`mixmae.stage` = 'pretrain'") if exp else []
        if runs and max(_steps(client, runs[0].info.run_id) or [0]) >= step:
            workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
                return
        time.sleep(0.2)


def test_a_killed_worker_resumes_from_checkpoint_with_continuous_metrics(tmp_path, synthetic_data):
    config = make_config(tmp_path, synthetic_data, epochs=10, checkpoint_every_steps=4)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after, args=(client, "tests", 10, done, killed), daemon=True)
    killer.start()
    try:
        outcome = run_pipeline(config, stages=["pretrain"], progress=False)
    finally:
        done.set()
        killer.join()
    assert killed, "the test never got to kill a worker"
    run = _stage_run(client, outcome)
    assert run.data.tags.get("mixmae.resumed_from", "").startswith("step ")
    steps = _steps(client, run.info.run_id)
    expected = list(range(2, steps[-1] + 1, 2))
    assert steps == expected, steps  # no gap, no step logged twice
    assert run.data.tags[COMPLETE] == "true"


def test_rerunning_the_same_command_resumes_instead_of_restarting(tmp_path, synthetic_data):
    first = make_config(tmp_path, synthetic_data, max_steps=4, epochs=10, checkpoint_every_steps=4)
    out1 = run_pipeline(first, stages=["pretrain"], progress=False)
    client = MlflowClient(out1.tracking_uri)
    # a longer run under the same name continues the same MLflow runs and checkpoints
    second = make_config(tmp_path, synthetic_data, max_steps=8, epochs=10, checkpoint_every_steps=4)
    run1 = _stage_run(client, out1)
    client.set_tag(run1.info.run_id, COMPLETE, "false")  # as if it had been stopped before finishing
    out2 = run_pipeline(second, stages=["pretrain"], progress=False)
    assert out2.run_id == out1.run_id and out2.stages[0].run_id == run1.info.run_id
    run2 = _stage_run(client, out2)
    assert run2.data.tags["mixmae.resumed_from"] == "step 4"
    assert _steps(client, run2.info.run_id) == [2, 4, 6, 8]
    # a finished stage is not run again
    out3 = run_pipeline(second, stages=["pretrain"], progress=False)
    assert out3.stages[0].skipped


def test_divergence_stops_with_step_and_last_good_checkpoint(tmp_path, synthetic_data):
    config = make_config(tmp_path, synthetic_data, base_lr=1e6, warmup_epochs=0, epochs=4, checkpoint_every_steps=2,
                         log_every_steps=2, scaling={"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 0})
    with pytest.raises(StageError, match=r"non-finite at step \d+.*Last good checkpoint"):
        run_pipeline(config, stages=["pretrain"], progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id], "tags.`mixmae.stage` = 'pretrain'")[0]
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags[FAILED_REASON]
