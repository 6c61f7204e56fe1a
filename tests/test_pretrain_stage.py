"""A stopped pretraining run continued past a corrupt checkpoint. (A clean pretraining run is
checked in test_pipeline_e2e.py; a killed worker and a lost node in test_worker_groups.py and
test_faults.py; a diverging one in test_sweep_plan.py's sweep.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import PipelineConfig
from pipelines.pipeline import run_pipeline
from pipelines.tracking import COMPLETE

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
        scaling={"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 1},
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


def test_rerunning_the_same_command_resumes_past_a_corrupt_newest_checkpoint(tmp_path, synthetic_data):
    first = make_config(tmp_path, synthetic_data, max_steps=4, epochs=10, checkpoint_every_steps=2)
    out1 = run_pipeline(first, stages=["pretrain"])
    client = MlflowClient(out1.tracking_uri)
    run1 = _stage_run(client, out1)
    client.set_tag(run1.info.run_id, COMPLETE, "false")  # as if it had been stopped before finishing
    # its newest checkpoint (step 4) truncated, as a crash in the middle of writing it leaves it
    newest = sorted(d for d in (tmp_path / "runs").glob("*/checkpoint_*") if d.is_dir())[-1]
    weights = newest / "model.safetensors"
    half = weights.stat().st_size // 2
    weights.write_bytes(weights.read_bytes()[:half])

    # a longer run under the same name continues the same MLflow runs, from the newest checkpoint that loads
    second = make_config(tmp_path, synthetic_data, max_steps=6, epochs=10, checkpoint_every_steps=2)
    out2 = run_pipeline(second, stages=["pretrain"])
    assert out2.run_id == out1.run_id and out2.stages[0].run_id == run1.info.run_id
    run2 = _stage_run(client, out2)
    assert run2.data.tags["mixmae.resumed_from"] == "step 2"
    assert run2.data.tags["mixmae.skipped_checkpoints"].startswith(f"{newest.name}: ")
    aside = tmp_path / "runs" / "corrupt_checkpoints" / newest.parent.name / newest.name / "model.safetensors"
    assert aside.stat().st_size == half  # the bad one kept as it was found
    assert _steps(client, run2.info.run_id) == [2, 4, 6]
    # a finished stage is not run again
    out3 = run_pipeline(second, stages=["pretrain"])
    assert out3.stages[0].skipped
