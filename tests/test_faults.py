"""Faults a long cluster run meets, each injected into real processes (the README's fault
matrix lists them): a dead cluster left on the machine, the tracking server going away, a
node lost with the storage in a bucket. (Preemption: test_determinism.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from mlflow.tracking import MlflowClient

from pipelines.config import REPO_ROOT
from pipelines.spool import Spool
from pipelines.stages.state import LOSS_METRIC
from pipelines.tracking import spooled_steps
from tests.servers import BIN, free_ports, launch, paused, training_workers, wait_for

pytestmark = pytest.mark.cluster

CLUSTER_CPUS = """
import sys
from pipelines.config import load_config
from pipelines.pipeline import init_ray
import ray
init_ray(load_config(sys.argv[1]))
print("cpus", int(ray.cluster_resources()["CPU"]))
"""


def test_a_dead_cluster_left_on_the_machine_is_not_joined_and_an_asked_for_one_fails_in_one_line():
    # Ray's temp dir follows TMPDIR: a private one holds the address file a killed `ray start` leaves
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as tmp:
        (Path(tmp) / "ray").mkdir()
        (dead_port,) = free_ports(1)
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead_port}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TMPDIR": tmp}
        private = subprocess.run(
            [sys.executable, "-c", CLUSTER_CPUS, str(REPO_ROOT / "ray_configs/pipelines/smoke.yaml")],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        assert private.returncode == 0, private.stderr[-3000:]
        assert "cpus " in private.stdout

        started = time.monotonic()
        asked = subprocess.run(
            [str(BIN / "mixmae"), "run", "ray_configs/pipelines/smoke.yaml"],
            cwd=REPO_ROOT, env=env | {"RAY_ADDRESS": f"127.0.0.1:{dead_port}"}, capture_output=True, text=True,
            timeout=300,
        )
        assert asked.returncode == 1
        assert f"no Ray cluster answers at 127.0.0.1:{dead_port} (RAY_ADDRESS)" in asked.stdout + asked.stderr
        assert "Traceback" not in asked.stdout + asked.stderr
        assert time.monotonic() - started < 120


def test_a_stage_outlives_the_tracking_server_and_its_records_wait_for_mixmae_sync(
    tmp_path, mlflow_server, ray_local, synthetic_data
):
    """The tracking server is stopped mid-stage and started again on the same port and store
    while training goes on: what was spooled meanwhile is delivered in order. It is stopped
    again until the stage has ended: the run exits 1 saying where its records wait, and `mixmae
    sync` delivers them, no step lost or repeated. The run joins the session's cluster, as
    `mixmae run` on a cluster's head would. (SIGTERM and the run that continues after it:
    test_determinism.py.)"""
    steps, log_every = 100, 2
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri,
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    command = [str(BIN / "mixmae"), "run", str(REPO_ROOT / "ray_configs/pipelines/smoke.yaml"), "--stages", "pretrain",
               "--set", f"synthetic.root={Path(synthetic_data['pretrain']).parent}",
               "--set", "pretrain.epochs=100", "--set", f"pretrain.max_steps={steps}",
               "--set", f"pretrain.log_every_steps={log_every}", "--set", "tracking.delivery_wait_s=5",
               "--set", "pretrain.checkpoint_every_steps=1000"]  # no periodic checkpoint: the stage's last only
    root = tmp_path / "mixmae_runs" / "tracking_spool"
    spool = lambda: next((d for d in root.glob("*") if "." not in d.name), tmp_path / "none")  # noqa: E731
    losses = lambda: spooled_steps(Spool(spool(), print), LOSS_METRIC)  # noqa: E731

    log = tmp_path / "run.log"
    run = launch(command, log, cwd=tmp_path, env=env)
    try:
        wait_for(lambda: len(losses()) >= 3, "logged losses", 300, run, log)
        mlflow_server.stop()
        stopped_at = len(losses())
        wait_for(lambda: len(losses()) >= stopped_at + 3, "losses spooled while the server is away", 300, run, log)
        # training waits, stopped, while the server starts (seconds), so the stage still has
        # steps left when the server goes away again, however long its start took
        with paused(training_workers()):
            mlflow_server.start()
        wait_for(lambda: Spool(spool(), print).pending() == 0, "delivery after the restart", 300, run, log)
        assert max(losses()) < steps, "the stage ended before the second outage"
        mlflow_server.stop()
        assert run.wait(timeout=600) == 1, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    output = log.read_text()
    assert "finished training and saved checkpoints" in output and "mixmae sync" in output
    assert "Traceback" not in output and Spool(spool(), print).pending() > 0

    mlflow_server.start()
    sync = subprocess.run([str(BIN / "mixmae"), "sync", str(REPO_ROOT / "ray_configs/pipelines/smoke.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0, sync.stdout[-3000:] + sync.stderr[-3000:]
    client = MlflowClient(mlflow_server.uri)
    run_id = spool().name
    history = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert history == list(range(log_every, steps + 1, log_every))
    tags = client.get_run(run_id).data.tags
    assert tags["mixmae.complete"] == "true" and "mixmae.model_uri" in tags
    assert "checkpoint/encoder.safetensors" in {a.path for a in client.list_artifacts(run_id, "checkpoint")}


NODE_LOST = """
import json, os, signal, sys, threading, time
import psutil
import ray
from ray.cluster_utils import Cluster
from pipelines import storage
from pipelines.config import load_config
from pipelines.pipeline import run_pipeline

# each node its own folder (where it keeps its tracking spool): no folder is shared
head, *own_dirs = json.loads(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "env_vars": {"MIXMAE_LOCAL_DIR": head}})
others = [cluster.add_node(num_cpus=2, env_vars={"MIXMAE_LOCAL_DIR": own}) for own in own_dirs]
cluster.wait_for_nodes()
config = load_config(sys.argv[1], [f"ray.address={cluster.address}", *sys.argv[3:]])
runs = storage.absolute(config.storage)

def registered_checkpoints():
    # Ray Train resumes from a checkpoint once its controller has registered it (not when it is written)
    for trainer in storage.folders(runs):
        try:
            snapshot = storage.read_text(storage.join(runs, trainer, "checkpoint_manager_snapshot.json"))
            return json.loads(snapshot)["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            pass
    return []

def training_workers():
    # {node: worker pids} of the non-head nodes, from the process table (each worker is a child of
    # its node's raylet): Ray's state API can take longer to answer than this stage runs
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in others}
    found = {}
    for process in psutil.process_iter(["cmdline", "ppid"]):
        if "RayTrainWorker" in " ".join(process.info["cmdline"] or []) and process.info["ppid"] in raylets:
            found.setdefault(raylets[process.info["ppid"]], []).append(process.pid)
    return found

def remove_a_workers_node_after_a_checkpoint():
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        hosting = training_workers()
        if registered_checkpoints() and hosting:
            lost, pids = next(iter(hosting.items()))
            cluster.remove_node(lost, allow_graceful=False)
            for pid in pids:  # a lost machine takes its processes with it
                os.kill(pid, signal.SIGKILL)
            print(f"removed a node with {len(pids)} of 2 workers", flush=True)
            return
        time.sleep(0.2)

def loudly():
    try:
        remove_a_workers_node_after_a_checkpoint()
    except BaseException as exc:
        print(f"removing a node failed: {exc!r}", flush=True)

threading.Thread(target=loudly, daemon=True).start()
outcome = run_pipeline(config, stages=["pretrain"])
print(json.dumps({"run_id": outcome.stages[0].run_id, "uri": outcome.tracking_uri}))
ray.shutdown()
cluster.shutdown()
"""


def test_a_node_lost_mid_stage_costs_only_the_steps_since_the_checkpoint(tmp_path, synthetic_data, s3):
    """Three nodes (raylets on this machine, each with its own CPUs and local folder), the
    two workers on two of them (STRICT_SPREAD), the storage in a bucket (the only place the
    nodes share); a node with a worker (not the head) is removed after the first checkpoint,
    and the stage resumes from it on the nodes left."""
    steps = 30
    bucket = s3.bucket(f"lost-{uuid.uuid4().hex[:8]}")
    nodes = [tmp_path / "head", tmp_path / "node1", tmp_path / "node2"]
    for node in nodes:
        node.mkdir()
    with tempfile.TemporaryDirectory(prefix="rn", dir="/tmp") as tmp:  # the cluster's address file stays private
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | s3.env | {"TMPDIR": tmp}
        result = subprocess.run(
            [sys.executable, "-c", NODE_LOST, str(REPO_ROOT / "ray_configs/pipelines/smoke.yaml"),
             json.dumps([str(node) for node in nodes]), f"storage=s3://{bucket}/runs",
             f"synthetic.root={Path(synthetic_data['pretrain']).parent}",
             "pretrain.epochs=100", f"pretrain.max_steps={steps}", "pretrain.checkpoint_every_steps=6",
             "pretrain.scaling.num_workers=2", "pretrain.scaling.placement_strategy=STRICT_SPREAD",
             "pretrain.scaling.max_failures=2", "tracking.system_metrics_every_s=1",
             "stage_groups=[]"],  # the probe, on one worker, leaves the pretraining's group
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "removed a node with 1 of 2 workers" in result.stdout
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    client = MlflowClient(outcome["uri"])
    run = client.get_run(outcome["run_id"])
    assert run.data.tags["mixmae.resumed_from"].startswith("step ")
    assert [m.step for m in client.get_metric_history(outcome["run_id"], "train/loss")] == list(range(2, steps + 1, 2))
    assert run.data.tags["mixmae.checkpoint"].startswith(f"s3://{bucket}/runs/")
    assert any(key.endswith("/encoder.safetensors") for key in s3.keys(bucket, "runs/"))
    assert not (tmp_path / "mixmae_runs").exists()
    # what rank 0 spooled stayed on its node's own disk (whichever node hosted it)
    spooled = {node.name: sorted(str(p.relative_to(node)) for p in node.glob("*/tracking_spool/*/records.jsonl")) for node in nodes}
    assert any(spooled.values()), (spooled, result.stdout[-2000:])
