"""Tracking pieces that hold without a tracking server: the system-metrics sampler, the spool
that keeps records while the server is away, delivery into a local MLflow store."""

from __future__ import annotations

import json
import os
import threading
import time

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from pipelines.spool import Spool, pending_spools
from pipelines.tracking import RunLogger, SystemSampler, open_spool, run_spool, server_away, spooled_step


def test_system_sampler_samples_on_its_interval_and_once_more_at_close():
    emitted: list[tuple[dict[str, float], int]] = []
    three = threading.Event()

    def emit(values, step):
        emitted.append((values, step))
        if len(emitted) >= 3:
            three.set()

    sampler = SystemSampler(emit, node="node1", interval=0.01, first_step=7).start()
    assert three.wait(timeout=30)
    sampler.close()
    steps = [step for _, step in emitted]
    assert steps == list(range(7, 7 + len(emitted)))
    assert all(key.startswith("system/node1/") for values, _ in emitted for key in values)
    assert 0 <= emitted[-1][0]["system/node1/cpu_utilization_percentage"] <= 100


def test_a_block_shorter_than_the_interval_still_gets_a_sample():
    emitted = []
    sampler = SystemSampler(lambda values, step: emitted.append(step), interval=3600).start()
    started = time.monotonic()
    sampler.close()
    assert emitted == [0] and time.monotonic() - started < 30


class FlakyServer:
    """A send that fails while ``away`` is set, and remembers what it took."""

    def __init__(self):
        self.away = True
        self.taken: list[dict] = []

    def __call__(self, record):
        if self.away:
            raise ConnectionError("Connection refused")
        self.taken.append(record)


def test_spool_keeps_records_while_the_server_is_away_and_delivers_them_once_in_order(tmp_path):
    server, said = FlakyServer(), []
    spool = Spool(tmp_path / "spool", server, said.append).start()
    for step in range(50):
        spool.append({"kind": "metrics", "metrics": [["train/loss", 1.0 / (step + 1), 0, step]]})
    assert not spool.drain(0.5) and spool.pending() == 50 and spool.has_pending() and server.taken == []
    assert len(said) == 1 and "not answering" in said[0] and "Connection refused" in said[0]
    server.away = False
    assert spool.close(30)
    assert [r["metrics"][0][3] for r in server.taken] == list(range(50))
    assert "answers again" in said[-1] and spool.pending() == 0 and not spool.has_pending()
    with (tmp_path / "spool" / "records.jsonl").open("a") as f:
        f.write('{"kind": "tags", "ta')  # a writer killed mid-line: nothing waits
    assert spool.pending() == 0 and not spool.has_pending()
    # a later sender of the same folder (the driver, `mixmae sync`) sends nothing twice
    again = Spool(tmp_path / "spool", server)
    assert again.drain(1) and len(server.taken) == 50


def test_what_a_closed_spool_could_not_deliver_waits_on_disk_for_the_next_sender(tmp_path):
    server = FlakyServer()
    spool = Spool(tmp_path / "spool", server, lambda m: None).start()
    spool.append({"kind": "tags", "tags": {"a": "1"}})
    assert not spool.close(0.2)
    with (tmp_path / "spool" / "records.jsonl").open("a") as f:
        f.write('{"kind": "tags", "ta')  # a writer killed mid-line: not yet a record
    assert spool.pending() == 1
    restarted = Spool(tmp_path / "spool", server)  # the next attempt of the worker appends after the torn line
    restarted.append({"kind": "tags", "tags": {"b": "2"}})
    server.away = False
    assert restarted.drain(5) and [r["tags"] for r in server.taken] == [{"a": "1"}, {"b": "2"}]


def test_metrics_delivered_twice_are_stored_once_and_artifacts_are_kept_until_sent(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("spool", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    spool = run_spool(tmp_path / "storage", uri, run_id)
    logger = RunLogger(uri, run_id, skip_through=1, spool=spool)
    for step in range(4):
        logger.metrics({"train/loss": float(step)}, step)
    picture = tmp_path / "picture.png"
    picture.write_bytes(b"png")
    logger.artifact(picture, "pictures")
    picture.unlink()  # a worker's temporary file, gone before the server answers
    assert spooled_step(spool, "train/loss") == 3
    assert pending_spools(tmp_path / "storage") == [spool.dir]
    assert open_spool(spool.dir).drain(30)
    spool.dir.joinpath("sent").unlink()  # delivered again from the start, as after a crash before `sent` was written
    assert open_spool(spool.dir).drain(30)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(2, 2.0), (3, 3.0)]
    assert [a.path for a in client.list_artifacts(run_id, "pictures")][0].endswith("picture.png")
    assert pending_spools(tmp_path / "storage") == []


def test_a_model_delivered_twice_is_one_logged_model(tmp_path, monkeypatch):
    """The worker's sender and the driver deliver the same spool: one at a time (the folder's
    lock), and a model record sent again after a crash finds its model instead of making another.
    Logging it leaves the process's MLFLOW_TRACKING_URI as it was (MLflow's fluent API sets it,
    and it would win over the next pipeline's config)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mixmae_core.checkpoint import save_state_dict
    from pipelines import stage_model
    from pipelines.config import load_config
    from pipelines.stages.jobs import StageJob

    config = load_config()
    job = StageJob("pretrain", config.pretrain, config.pretrain.model)
    weights = tmp_path / "encoder.safetensors"
    save_state_dict(weights, stage_model.build(stage_model.job_config(job)).state_dict())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("models", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    spool = run_spool(tmp_path / "storage", uri, run_id)
    RunLogger(uri, run_id, spool=spool).model(stage_model.job_config(job), weights)
    senders = [open_spool(spool.dir), open_spool(spool.dir)]
    threads = [threading.Thread(target=sender.drain, args=(120,)) for sender in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spool.dir.joinpath("sent").unlink()  # delivered again from the start, as after a crash before `sent` was written
    assert open_spool(spool.dir).drain(120)
    models = client.search_logged_models([experiment])
    assert len(models) == 1 and models[0].source_run_id == run_id
    assert client.get_run(run_id).data.tags["mixmae.model_uri"] == models[0].model_uri
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_a_record_the_server_refuses_is_set_aside_with_its_reason_and_the_rest_still_go(tmp_path):
    taken = []

    def send(record):
        if record["tags"].get("bad"):
            raise MlflowException("Invalid value for tag", INVALID_PARAMETER_VALUE)
        taken.append(record)

    said = []
    spool = Spool(tmp_path, send, said.append, server_away)
    for tags in ({"a": "1"}, {"bad": "x"}, {"b": "2"}):
        spool.append({"kind": "tags", "tags": tags})
    assert spool.drain(5)
    assert [r["tags"] for r in taken] == [{"a": "1"}, {"b": "2"}]
    rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["record"]["tags"] == {"bad": "x"} and "Invalid value" in rejected[0]["error"]
    assert len(said) == 1 and "refused" in said[0]
    assert server_away(MlflowException("API request failed", INTERNAL_ERROR)) and server_away(ConnectionError())


def test_mixmae_sync_delivers_what_waits_and_says_so_when_the_server_is_still_away(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.config import REPO_ROOT
    from tests.servers import free_ports

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sync")).info.run_id
    storage = tmp_path / "runs"
    RunLogger(uri, run_id, spool=run_spool(storage, uri, run_id)).metrics({"train/loss": 0.5}, 10)
    (dead,) = free_ports(1)
    away = run_spool(storage, f"http://127.0.0.1:{dead}", "0" * 32)
    away.append({"kind": "tags", "tags": {"a": "1"}})
    command = ["sync", str(REPO_ROOT / "ray_configs/pipelines/smoke.yaml"), "--set", f"storage={storage}",
               "--set", "tracking.delivery_wait_s=1"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1 and "did not take the records" in result.output and away.dir.name in result.output
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(10, 0.5)]
    assert pending_spools(storage) == [away.dir]
    (away.dir / "run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))  # the server is back
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0 and "nothing left to deliver" in result.output
    assert client.get_run(run_id).data.tags["a"] == "1"


def test_a_spool_whose_local_store_is_gone_is_named_and_left_and_no_store_is_made_in_its_place(tmp_path):
    """A run's SQLite store deleted with its records still spooled (a test's temp dir, a
    workspace wiped): delivery would make a new, empty store there and have every record
    refused. `mixmae sync` names the store and the folder, leaves both as they are, and still
    delivers the spools whose store is there."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.config import REPO_ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("kept")).info.run_id
    storage = tmp_path / "runs"
    RunLogger(uri, run_id, spool=run_spool(storage, uri, run_id)).metrics({"train/loss": 0.5}, 10)
    gone_store = tmp_path / "wiped" / "mlflow.db"
    gone_store.parent.mkdir()
    gone_client = MlflowClient(f"sqlite:///{gone_store}")
    gone_run = gone_client.create_run(gone_client.create_experiment("wiped")).info.run_id
    orphan = run_spool(storage, f"sqlite:///{gone_store}", gone_run)
    orphan.append({"kind": "tags", "tags": {"a": "1"}})
    gone_store.unlink()  # its folder is still there: a client would make a new store in it
    command = ["sync", str(REPO_ROOT / "ray_configs/pipelines/smoke.yaml"), "--set", f"storage={storage}",
               "--set", "tracking.delivery_wait_s=1"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert f"{gone_store}, no longer exists" in " ".join(result.output.split()) and orphan.dir.name in result.output
    assert not gone_store.exists() and pending_spools(storage) == [orphan.dir] and orphan.pending() == 1
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(10, 0.5)]
