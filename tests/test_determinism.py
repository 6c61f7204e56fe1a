"""What a step trains on depends on the seed, epoch, step and number of workers only: two runs
of the quickstart's pretraining on 2 workers log the same loss at every step, and so does a run
with its storage in a bucket, stopped by SIGTERM mid-epoch and run again; a sharded run whose worker is killed mid-epoch (Ray
Train restarts the group) logs it within float tolerance. All trained on the same image ids at
every step (the ``data/fingerprint`` chain); the continued run decoded nothing it had trained on. An epoch
ends at its last full step: its leftover images are neither decoded nor counted. A rerun passes
over a truncated newest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import storage
from pipelines.config import DEFAULT_CONFIG, load_config
from pipelines.pipeline import run_pipeline
from pipelines.spool import Spool, spool_root
from pipelines.stages.loop import FINGERPRINT_METRIC
from pipelines.stages.state import LOSS_METRIC
from pipelines.tracking import STAGE, spooled_steps
from tests.servers import BIN, WorkerKiller, launch, paused, training_workers, wait_for

pytestmark = pytest.mark.timeout(900)

#: 80 images, 24 a step: 3 steps an epoch and 8 images left over each epoch; a checkpoint
#: every 4 steps falls mid-epoch (epoch 1, step 1)
STEPS, BATCH, EPOCHS = 12, 24, 4
SETTINGS = [f"pretrain.epochs={EPOCHS}", f"pretrain.batch_size={BATCH}", "pretrain.log_every_steps=1",
            "pretrain.checkpoint_every_steps=4", "pretrain.reconstructions=0", "tracking.system_metrics=false"]


def _overrides(work: Path, synthetic_data: dict) -> list[str]:
    return [f"storage={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            f"synthetic.root={Path(synthetic_data['pretrain']).parent}", *SETTINGS]


def _pretrain_run(work: Path):
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mixmae-quickstart").experiment_id
    (run,) = client.search_runs([experiment], f"tags.`{STAGE}` = 'pretrain'")
    return client, run


def _history(work: Path, key: str) -> list[tuple[int, float]]:
    client, run = _pretrain_run(work)
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local, synthetic_data):
    work = tmp_path_factory.mktemp("reference")
    run_pipeline(load_config(DEFAULT_CONFIG, _overrides(work, synthetic_data)), stages=["pretrain"])
    return work


def _same_training(work: Path, reference: Path) -> None:
    for key in (LOSS_METRIC, FINGERPRINT_METRIC):
        assert _history(work, key) == _history(reference, key), key


def test_an_epoch_ends_at_its_last_full_step_and_counts_only_what_trained(reference):
    losses = _history(reference, LOSS_METRIC)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    assert len({value for _, value in _history(reference, FINGERPRINT_METRIC)}) == STEPS
    images = dict(_history(reference, "data/images_attempted"))
    assert images[STEPS] == STEPS * BATCH  # the 8 images left over each epoch were never decoded
    flops = dict(_history(reference, "flops/train_total"))
    per_image = dict(_history(reference, "flops/train_per_image"))[0]
    assert flops[STEPS] == pytest.approx(STEPS * BATCH * per_image)


def test_a_rerun_resumes_from_the_newest_checkpoint_that_loads(tmp_path, ray_local, synthetic_data):
    """The newest checkpoint of a stopped stage is truncated: the rerun, its driver and its
    worker alike, passes it over (named in the run, a copy kept as found) and continues from
    the one before, no logged step lost or repeated. (In a bucket, the same choice:
    test_storage.py.)"""
    settings = [*_overrides(tmp_path, synthetic_data), "pretrain.scaling.num_workers=1", "pretrain.log_every_steps=2",
                "pretrain.checkpoint_every_steps=2"]
    run_pipeline(load_config(DEFAULT_CONFIG, [*settings, "pretrain.max_steps=4"]), stages=["pretrain"])
    client, run = _pretrain_run(tmp_path)
    client.set_tag(run.info.run_id, "mixmae.complete", "false")  # as if it had been stopped before finishing
    newest = sorted((tmp_path / "runs").glob("*/checkpoint_*/model.safetensors"))[-1]
    weights = newest.read_bytes()
    newest.write_bytes(weights[: len(weights) // 2])

    run_pipeline(load_config(DEFAULT_CONFIG, [*settings, "pretrain.max_steps=6"]), stages=["pretrain"])
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["mixmae.resumed_from"] == "step 2" and tags["mixmae.complete"] == "true"
    assert tags["mixmae.skipped_checkpoints"].startswith(f"{newest.parent.name}: ")
    aside = tmp_path / "runs" / "corrupt_checkpoints" / newest.parent.parent.name / newest.parent.name / newest.name
    assert aside.stat().st_size == len(weights) // 2
    assert [step for step, _ in _history(tmp_path, LOSS_METRIC)] == [2, 4, 6]


def _registered_checkpoint_steps(storage: Path) -> list[int]:
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        return [int(result["metrics"]["step"]) for result in json.loads(snapshot.read_text())["checkpoint_results"]]
    return []


def test_a_worker_killed_mid_epoch_resumes_sharded_on_the_same_data(reference, tmp_path, synthetic_data):
    """Two runs with one seed, the sharded one (FSDP) losing a worker mid-epoch: Ray Train
    restarts the group, which resumes from a checkpoint gathered from and scattered back to the
    shards and trains on the uninterrupted run's images at every step; its gradients are
    reduce-scattered instead of all-reduced, so its loss matches within float tolerance. (Under
    DDP a resumed run is bitwise the same: the SIGTERM test below; a restarted group reads its
    checkpoint as a new driver does.)"""
    config = load_config(DEFAULT_CONFIG, [*_overrides(tmp_path, synthetic_data), "pretrain.scaling.parallelism=fsdp"])
    with WorkerKiller(lambda: _registered_checkpoint_steps(tmp_path / "runs")) as killer:
        run_pipeline(config, stages=["pretrain"])
    assert killer.killed, "the run ended before a worker could be killed"
    client, run = _pretrain_run(tmp_path)
    assert run.data.tags["mixmae.resumed_from"] == "step 4"
    assert _history(tmp_path, FINGERPRINT_METRIC) == _history(reference, FINGERPRINT_METRIC)
    sharded, replicated = _history(tmp_path, LOSS_METRIC), _history(reference, LOSS_METRIC)
    assert [step for step, _ in sharded] == [step for step, _ in replicated]
    assert [value for _, value in sharded] == pytest.approx([value for _, value in replicated], rel=1e-4)


def test_a_run_into_a_bucket_stopped_by_sigterm_mid_epoch_continues_from_it_on_the_same_data(
    reference, tmp_path, ray_local, synthetic_data, s3, monkeypatch
):
    """`mixmae pretrain` of the quickstart with its storage and the MLflow artifacts in a bucket
    (moto's S3 server), joining the session's cluster, whose processes hold the keys but were
    never told the endpoint: the run takes it to them, never a key. The driver gets SIGTERM
    mid-epoch: its workers save a checkpoint in the bucket at their next step and it exits 75;
    the same command again (a new driver, a new count of decoded images) reads on from each
    worker's position in that checkpoint: it trains on the local uninterrupted run's images with
    its losses, and decodes exactly the images of the steps left. Nothing of the storage lands on
    a local disk but the node's tracking spool; no credential lands in the runs or any log."""
    bucket = s3.bucket(f"sigterm-{uuid.uuid4().hex[:8]}")
    runs = f"s3://{bucket}/runs"
    # the cluster's own logs: what this test's runs add to them (other tests share the cluster)
    cluster_logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    logged_before = {log: log.stat().st_size for log in cluster_logs.glob("*") if log.is_file()}
    for name, value in s3.env.items():  # this process reads the bucket too
        monkeypatch.setenv(name, value)
    experiment = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment(
        "mixmae-quickstart", artifact_location=f"s3://{bucket}/mlartifacts")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    # the images stay in their folder (a volume every node mounts), read in the reference's order
    settings = [*_overrides(tmp_path, synthetic_data), f"storage={runs}", f"pretrain.data.root={synthetic_data['pretrain']}"]
    command = [str(BIN / "mixmae"), "pretrain", str(DEFAULT_CONFIG), *(arg for item in settings for arg in ("--set", item))]
    spools = spool_root(storage.local_root(runs))  # rank 0's node's own folder
    spool = lambda: next((d for d in spools.glob("*") if "." not in d.name), None)  # noqa: E731

    def trained_through(step: int) -> bool:
        folder = spool()
        return folder is not None and max(spooled_steps(Spool(folder, print), LOSS_METRIC), default=0) >= step

    log = tmp_path / "first.log"
    first = launch(command, log, cwd=tmp_path, env=env)
    workers: list[int] = []
    try:
        def both_workers() -> bool:
            workers[:] = training_workers()
            return len(workers) == 2

        wait_for(both_workers, "two training workers", 300, first, log, every_s=0.1)
        # A step takes a fraction of a second, the driver a second to act on SIGTERM: the workers
        # wait, stopped, from epoch 1's step 2 (after the checkpoint at 4) until the driver has
        # asked them to stop, so their next step is the one they stop at, whatever the timing.
        wait_for(lambda: trained_through(5), "step 5", 300, first, log, every_s=0.1)
        with paused(workers):
            first.send_signal(signal.SIGTERM)
            wait_for(lambda: any(key.endswith(".stop") for key in s3.keys(bucket, "runs/control/")),
                     "the driver's stop request", 300, first, log, every_s=0.1)
        assert first.wait(timeout=300) == 75, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    client, run = _pretrain_run(tmp_path)
    stopped_at = int(run.data.tags["mixmae.preempted"].split()[-1])
    assert 5 <= stopped_at < STEPS and run.info.status == "KILLED"
    output = log.read_text()
    assert f"pretrain saved a checkpoint at step {stopped_at}; run the same command again to continue" in output
    assert "Traceback" not in output

    log = tmp_path / "second.log"
    second = launch(command, log, cwd=tmp_path, env=env)
    assert second.wait(timeout=600) == 0, log.read_text()[-3000:]
    client, run = _pretrain_run(tmp_path)
    tags = run.data.tags
    assert tags["mixmae.resumed_from"] == f"step {stopped_at}"
    _same_training(tmp_path, reference)
    assert dict(_history(tmp_path, "data/images_attempted"))[STEPS] == (STEPS - stopped_at) * BATCH

    keys = s3.keys(bucket, "runs/")
    checkpoints = sorted(key.rsplit("/", 1)[0] for key in keys if "/checkpoint_" in key and key.endswith("/model.safetensors"))
    assert tags["mixmae.checkpoint"] == f"s3://{bucket}/{checkpoints[-1]}"
    assert tags["mixmae.encoder_checkpoint"] == f"s3://{bucket}/{checkpoints[-1]}/encoder.safetensors"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mixmae_runs").exists()
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/model.safetensors", "checkpoint/encoder.safetensors"} <= logged and "mixmae.model_uri" in tags
    assert any(key.endswith("/checkpoint/encoder.safetensors") for key in s3.keys(bucket, "mlartifacts/"))

    secrets = list(s3.CREDENTIALS.values())
    for recorded in client.search_runs([experiment]):
        values = [*recorded.data.params.values(), *recorded.data.tags.values()]
        assert not [value for value in values if any(secret in value for secret in secrets)], recorded.info.run_name
    logs = s3.keys(bucket, "runs/logs/")  # each command's log, copied there when it ended
    assert len(logs) == 2 and all(key.startswith("runs/logs/quickstart-") for key in logs)
    for key in logs:
        text = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        assert not any(secret in text for secret in secrets)
    leaked = [log for log in cluster_logs.glob("*") if log.is_file() and s3.SECRET.encode() in _added(log, logged_before)]
    assert not leaked


def _added(log: Path, sizes: dict[Path, int]) -> bytes:
    with log.open("rb") as file:
        file.seek(sizes.get(log, 0))
        return file.read()
