"""Real processes for the integration tests: free loopback ports, a child with its output in a
file, polling with a deadline, and stopping exactly what a test started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def actors(class_name: str, **filters: str) -> list:
    """Actors of this process's Ray cluster, named by its address: with another cluster on the
    machine, Ray's auto-detection would refuse to choose."""
    import ray
    from ray.util.state import list_actors

    predicates = [("class_name", "=", class_name), *((key, "=", value) for key, value in filters.items())]
    return list_actors(address=ray.get_runtime_context().gcs_address, filters=predicates, limit=10_000)


def training_workers() -> list[int]:
    """The pids of this cluster's live Ray Train workers."""
    return [actor.pid for actor in actors("RayTrainWorker", state="ALIVE")]


@contextlib.contextmanager
def paused(pids: list[int]):
    """The processes stopped (SIGSTOP) for the block and continued after it, whatever happens
    (one that has ended meanwhile is passed over)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


class WorkerKiller:
    """While a block runs, SIGKILL one Ray Train worker of this cluster once ``ready()`` holds
    (polled every 0.1 s, for up to 300 s); ``killed`` holds its pid. The workers are looked up
    as soon as they exist, so the kill follows ``ready()`` at once: a lookup through Ray's state
    API can take longer than a few steps, after which the moment the test waited for is past."""

    def __init__(self, ready) -> None:
        import threading

        self.ready, self.killed, self.done = ready, [], threading.Event()
        self.thread = threading.Thread(target=self._kill, daemon=True)

    def _kill(self) -> None:
        import os
        import signal

        deadline = time.monotonic() + 300
        workers: list[int] = []
        while time.monotonic() < deadline and not self.done.is_set():
            workers = workers or training_workers()
            try:
                ready = bool(workers) and self.ready()
            except (OSError, ValueError):  # a file being written
                ready = False
            if ready:
                try:
                    os.kill(workers[-1], signal.SIGKILL)
                except ProcessLookupError:  # a worker of an earlier group, still listed as alive
                    workers = []
                    continue
                self.killed.append(workers[-1])
                return
            time.sleep(0.1)

    def __enter__(self) -> "WorkerKiller":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


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


def wait_for(check, what: str, deadline_s: float, process: subprocess.Popen, log: Path, every_s: float = 0.5):
    """Poll ``check`` every ``every_s`` until it holds; if ``process`` dies first, fail with the end of its ``log``.
    A check that raises counts as not holding yet (a server refuses connections while it starts);
    the timeout names its last error."""
    deadline = time.monotonic() + deadline_s
    last_error = None
    while True:
        try:
            if check():
                return
        except Exception as exc:
            last_error = exc
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {deadline_s:.0f} s"
                               f"{f' (the check last raised {type(last_error).__name__}: {last_error})' if last_error else ''}:"
                               f"\n{log.read_text()[-3000:]}") from last_error
        time.sleep(every_s)


def http_answers(url: str) -> bool:
    """Up, whatever the answer: with token auth Ray's dashboard answers 401 to anonymous calls."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        pass
    return True


def stop(process: subprocess.Popen, marker: str) -> None:
    """Stop a process we started, every process under it, and every process it left behind
    (found by ``marker`` in their command line, e.g. the cluster's private temp dir), nothing
    else. The tree is taken before anything stops: Ray's daemons rename themselves
    (``ray::DashboardAgent``) and, orphaned by their raylet, can spin on a core for minutes.
    Nothing of a test cluster or server needs saving, so each gets SIGKILL (`ray start
    --block` alone takes 30 s to wind its cluster down on SIGTERM)."""
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    deadline = time.monotonic() + 15
    while True:
        left = [p for p in tree if _alive(p)]
        left += [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or []) and _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    process.wait(5)
    assert not left, f"processes of the test cluster still running: {[p.pid for p in left]}"


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over a store in ``root``; stopped and started again, it
    keeps its port and store (as a restarted tracking server does). Started as the README
    starts it: without MLflow's job runner, whose 8 processes serve GenAI jobs only."""

    def __init__(self, root: Path):
        (self.port,) = free_ports(1)
        self.root = root
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        log = self.root / "mlflow_server.log"
        self.process = launch(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination",
             str(self.root / "art")],
            log, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        wait_for(lambda: http_answers(f"{self.uri}/health"), "MLflow server", 120, self.process, log)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, str(self.root / "server.db"))
            self.process = None


class MotoServer:
    """moto's S3 server on 127.0.0.1, its buckets in memory. ``env`` holds the standard
    variables its clients read: :data:`CREDENTIALS` (moto takes any key; the secret is
    distinctive, so a test can look for it where it must not be) and ``place``, where the store
    is. ``enforce_auth``: every request needs a key moto knows, so these are refused, as a
    store refuses credentials it does not know."""

    SECRET = "mixmae-test-secret-8c1f2e"
    CREDENTIALS = {"AWS_ACCESS_KEY_ID": "mixmae-test-key", "AWS_SECRET_ACCESS_KEY": SECRET}

    def __init__(self, root: Path, enforce_auth: bool = False):
        (self.port,) = free_ports(1)
        self.root = root
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.enforce_auth = enforce_auth
        self.place = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                      "MLFLOW_S3_ENDPOINT_URL": self.endpoint}
        self.env = {**self.CREDENTIALS, **self.place}
        self.process: subprocess.Popen | None = None

    def start(self) -> "MotoServer":
        log = self.root / f"moto_server_{self.port}.log"
        auth = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if self.enforce_auth else {}
        self.process = launch([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)], log,
                              env={**os.environ, **auth})
        wait_for(lambda: http_answers(f"{self.endpoint}/moto-api/"), "moto server", 60, self.process, log)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.SECRET)

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, f"moto_server -H 127.0.0.1 -p {self.port}")
            self.process = None
