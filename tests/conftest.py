"""Shared fixtures: one local Ray cluster per test process (starting Ray costs seconds).

Tiers (pytest markers, given here so no test can be left out of one):

* ``fast``: unit tests in this process, no Ray (``make test-fast``, under 2 minutes);
* ``slow``: in-process tests that train for tens of seconds (marked ``@pytest.mark.slow``);
* ``ray``: tests on the session's local Ray cluster (they use the ``ray_local`` fixture);
* ``cluster``: tests that start their own cluster or servers (``ray start``, ``mlflow
  server``), marked ``@pytest.mark.cluster`` in their module.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

# Quiet, fail-fast Ray for tests on a 2-core machine.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# What the code keeps between runs (`mixmae plan`'s prices) and a node's own folder (the
# tracking spools of runs into a bucket, found by the bucket's name) go to the test process's
# own folders: a run starting in the machine's shared one delivered spools another session had
# left there, into a store that was gone.
for variable, prefix in (("MIXMAE_CACHE_DIR", "mixmae-test-cache-"), ("MIXMAE_LOCAL_DIR", "mixmae-test-node-")):
    os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)
SESSION = pytest.StashKey[pytest.Session]()


def pytest_sessionstart(session):
    session.config.stash[SESSION] = session


def pytest_configure(config):
    """Under pytest-xdist (the fast tier runs on every core), each worker gets its share of the
    cores for torch's threads: workers that each start a thread per core fight over them, and
    the tier took longer on 2 workers than on 1."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's verdict once it has reported, as ``mixmae`` ends
    (:func:`pipelines.process_end.end_process`: the session's Ray driver leaves threads that
    can crash the interpreter's teardown)."""
    session = config.stash.get(SESSION, None)
    if session is None:  # --help, --version: no session ran
        return
    from pipelines.process_end import end_process

    end_process(int(session.exitstatus))


#: The Ray tiers' modules, longest first (their tests' times side by side, two workers). `make
#: test` deals them to two pytest-xdist workers in collection order (`--no-loadscope-reorder`:
#: by default xdist deals the modules with the most tests first, and the sweeps, 5 minutes,
#: came seventh of eleven), each worker taking the next module while its last two tests run. The
#: shortest come last, so neither worker is left alone with a long one at the end.
LONGEST_FIRST = ("test_determinism.py", "test_pipeline_e2e.py", "test_sweep_plan.py", "test_faults.py",
                 "test_methods_pipeline.py", "test_cluster_job.py", "test_pretraining_helps.py",
                 "test_worker_groups.py", "test_data_pipeline.py", "test_object_storage.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("cluster") or item.get_closest_marker("slow"):
            continue
        item.add_marker(pytest.mark.ray if "ray_local" in item.fixturenames else pytest.mark.fast)
    items[:] = longest_first(items)


def longest_first(items: list) -> list:
    """``items`` with the modules of :data:`LONGEST_FIRST` first, in its order; each module's
    items keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    return sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _fast_tests_start_no_ray(request):
    """A test of the fast tier that starts Ray belongs in another tier."""
    def running() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    before = running()
    yield
    if request.node.get_closest_marker("fast") and running() and not before:
        sys.modules["ray"].shutdown()
        pytest.fail("a fast-tier test started Ray: give it the ray_local fixture")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster shared by the session's integration tests (each pytest-xdist worker
    has its own), with the quickstart's 4 logical CPUs (on 2 cores): its stages and their Ray
    Data tasks run side by side. Its processes hold the credentials of the tests' S3 server, as
    a cluster's nodes hold their own; a run that uses the server tells them where it is."""
    import ray

    from pipelines.config import DEFAULT_CONFIG, load_config
    from pipelines.pipeline import init_ray
    from tests.servers import MotoServer

    if not ray.is_initialized():
        with pytest.MonkeyPatch.context() as patch:
            for name, value in MotoServer.CREDENTIALS.items():
                patch.setenv(name, value)
            init_ray(load_config(DEFAULT_CONFIG))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """Every synthetic dataset (tiny scale, seed 0) as ``{name: root}``; layouts in ``SYNTH_LAYOUTS``."""
    from pipelines.data.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth"), "tiny", seed=0)


def _png_header_only(path, width, height):
    """A valid PNG declaring ``width x height`` 1-bit pixels in a few bytes (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def bad_images(tmp_path_factory):
    """One file per kind of messy input, with the decode outcome it must get:
    ``{name: (absolute path, status, reason)}``. ``missing.jpg`` is listed but never written."""
    import io

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("bad_images")
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    good.save(buf, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    palette = good.convert("P")
    writers = {
        "truncated.jpg": (lambda p: p.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10]), "skipped", "truncated"),
        "empty.jpg": (lambda p: p.write_bytes(b""), "skipped", "empty"),
        "missing.jpg": (lambda p: None, "skipped", "missing"),
        "text.jpg": (lambda p: p.write_text("not an image"), "skipped", "not_an_image"),
        "tiny.png": (lambda p: Image.new("RGB", (1, 1)).save(p), "skipped", "too_small"),
        "bomb.png": (lambda p: _png_header_only(p, 20000, 20000), "skipped", "too_large"),
        "png_named.jpg": (lambda p: good.save(p, "PNG"), "ok", None),
        "cmyk.jpg": (lambda p: good.convert("CMYK").save(p, "JPEG"), "converted", "mode_CMYK"),
        "gray.jpg": (lambda p: good.convert("L").save(p, "JPEG"), "converted", "mode_L"),
        "palette.png": (lambda p: palette.save(p, transparency=0), "converted", "mode_P"),
        "rgba.png": (lambda p: good.convert("RGBA").save(p), "converted", "mode_RGBA"),
        "deep16.png": (
            lambda p: Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(p), "converted", "mode_I;16"
        ),
        "rotated.jpg": (lambda p: good.save(p, "JPEG", exif=exif), "converted", "exif_rotated"),
    }
    out = {}
    for name, (write, status, reason) in writers.items():
        write(root / name)
        out[name] = (root / name, status, reason)
    return out


@pytest.fixture(scope="session")
def bad_dataset(tmp_path_factory, bad_images):
    """A places-layout root whose ``train.txt`` lists every bad image (label 0) and one good
    image ``good.jpg`` (label 1)."""
    import shutil

    from PIL import Image

    root = tmp_path_factory.mktemp("bad_dataset")
    for path, _, _ in bad_images.values():
        if path.exists():
            shutil.copy(path, root / path.name)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "good.jpg")
    (root / "train.txt").write_text("".join(f"{name} 0\n" for name in bad_images) + "good.jpg 1\n")
    return root


@pytest.fixture
def mlflow_server(tmp_path):
    """A real tracking server on loopback for one test (``.uri``; ``.stop()``/``.start()`` restart it)."""
    from tests.servers import MlflowServer

    server = MlflowServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on loopback for the session (``.env``, ``.bucket(name)``, ``.keys(bucket)``);
    each test makes its own buckets. The variables are given to what a test starts, never set here."""
    from tests.servers import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on loopback, with the venv first on PATH (as from an
    activated venv) and token auth, each port chosen free and a private temp dir, so a
    cluster already on this machine is neither reused nor disturbed."""
    import shutil
    import tempfile

    from tests.servers import BIN, free_ports, http_answers, launch, stop, wait_for

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
        # The dashboard takes jobs only once the head's agent is up, and answers 500 ("No available
        # agent") after waiting 10 s for it: on a busy machine the agent can start later than that.
        wait_for(lambda: http_answers(f"http://127.0.0.1:{agent}/api/healthz"), "Ray dashboard agent", 180, head, log)
        yield address, env
    finally:
        stop(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
