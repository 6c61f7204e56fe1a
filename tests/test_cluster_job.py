"""The README's cluster path, as written: `ray start --head` from the project's environment,
an MLflow tracking server, `ray job submit --working-dir . --runtime-env ... -- mixmae run
ray_configs/pipelines/smoke.yaml`. Only what this test starts is stopped afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.config import REPO_ROOT

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(args: list[str], log: Path, **popen) -> subprocess.Popen:
    """Start ``args`` with stdout and stderr going to ``log`` (the child keeps its own descriptor)."""
    with log.open("w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **popen)


def wait_for(check, what: str, deadline_s: float, process: subprocess.Popen, log: Path):
    """Poll ``check`` until it holds; if ``process`` dies first, fail with the end of its ``log``."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {deadline_s:.0f} s")
        time.sleep(0.5)


def http_answers(url: str) -> bool:
    """Up, whatever the answer: with token auth Ray's dashboard answers 401 to anonymous calls."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        pass
    return True


def stop(process: subprocess.Popen, marker: str) -> None:
    """Stop a process we started and every process it left behind (found by ``marker`` in
    their command line, e.g. the cluster's private temp dir), nothing else. Each gets
    SIGTERM, then SIGKILL after 5 s: `ray start --block` alone takes 30 s to wind its
    cluster down on SIGTERM, and nothing of a test cluster needs saving."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
    deadline = time.monotonic() + 15
    while True:
        left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
        if not left or time.monotonic() > deadline:
            break
        for p in left:
            p.kill() if time.monotonic() > deadline - 10 else p.terminate()
        time.sleep(0.5)
    assert not left, f"processes of the test cluster still running: {[p.pid for p in left]}"


@pytest.fixture
def mlflow_server(tmp_path):
    (port,) = free_ports(1)
    log = tmp_path / "mlflow_server.log"
    server = launch(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art")],
        log,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_answers(f"{uri}/health"), "MLflow server", 120, server, log)
        yield uri
    finally:
        stop(server, str(tmp_path / "server.db"))


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on loopback, with the venv first on PATH (as from an
    activated venv) and token auth, each port chosen free and a private temp dir, so a
    cluster already on this machine is neither reused nor disturbed."""
    temp_dir = tempfile.mkdtemp(prefix="mxr", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dashboard, client, agent, agent_grpc, metrics, env_agent, node, objects = free_ports(9)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "ray_start.log"
    head = launch(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--num-cpus", "2", "--temp-dir", temp_dir, "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(env_agent), "--node-manager-port", str(node),
         "--object-manager-port", str(objects), "--disable-usage-stats"],
        log, env=env,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for(lambda: http_answers(f"{address}/api/version"), "Ray dashboard", 180, head, log)
        yield address, env
    finally:
        stop(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_smoke_config_submitted_as_a_ray_job_records_to_the_tracking_server(tmp_path, ray_head, mlflow_server):
    address, env = ray_head
    runtime_env = yaml.safe_load((REPO_ROOT / "ray_configs/cluster/runtime_env.yaml").read_text())
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = mlflow_server
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env", str(tmp_path / "runtime_env.yaml"), "--", "mixmae", "run", "ray_configs/pipelines/smoke.yaml"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout, submit.stdout[-3000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("mixmae-smoke")
    runs = client.search_runs([experiment.experiment_id])
    pipeline = next(r for r in runs if r.data.tags.get("mixmae.kind") == "pipeline")
    stage = next(r for r in runs if r.data.tags.get("mixmae.stage") == "pretrain")
    assert pipeline.info.status == "FINISHED" and stage.data.tags["mlflow.parentRunId"] == pipeline.info.run_id
    assert [m.step for m in client.get_metric_history(stage.info.run_id, "train/loss")] == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(stage.info.run_id, "checkpoint")}
    assert "checkpoint/encoder.safetensors" in artifacts
