"""Storage, data and MLflow artifacts in an object store: moto's S3 server on loopback (its
own process), reached only through the standard environment. (Fast checks of the storage
helpers on local paths are in test_storage.py; the quickstart's pretraining into a bucket,
stopped and continued from it, in test_determinism.py; a node lost with the storage in a bucket
and no folder shared between nodes in test_faults.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines import storage
from pipelines.config import REPO_ROOT, PipelineConfig
from pipelines.data.manifest import build_manifest, open_source, pack_manifest, write_manifest
from pipelines.data.synth import SYNTH_LAYOUTS
from pipelines.pipeline import run_pipeline
from pipelines.stages.jobs import StageError
from tests.servers import BIN, MotoServer, free_ports

pytestmark = pytest.mark.cluster


def _read_in_a_task(env: dict, sources: list) -> list:
    """Each source's first epoch as ``{pair ids: (images, masks)}``, read as a stage's worker
    reads it: in a Ray process told where the store is by its runtime env, as a run tells a
    cluster it joins, whose Ray Data tasks inherit it."""
    import ray

    from tests.test_data_pipeline import _epoch

    def read():
        from pipelines.data.datasets import pretrain_dataset
        from pipelines.data.order import Shard

        return [_epoch(pretrain_dataset(source, img_size=64, seed=3, shard=Shard(epoch=1))) for source in sources]

    return ray.get(ray.remote(read).options(runtime_env={"env_vars": env}).remote())


def test_manifests_packed_shards_and_images_are_read_from_a_bucket(tmp_path, s3, ray_local, synthetic_data, monkeypatch):
    bucket = s3.bucket(f"data-{uuid.uuid4().hex[:8]}")
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    root = synthetic_data["pretrain"]
    local = write_manifest(build_manifest(SYNTH_LAYOUTS["pretrain"], root), tmp_path / "pretrain.parquet")
    table = open_source(local).table()
    remote_paths = []
    for path in table.column("path").to_pylist():
        remote_paths.append(f"s3://{bucket}/images/{Path(path).relative_to(root)}")
        storage.upload(Path(path), remote_paths[-1])
    in_bucket = table.set_column(table.schema.get_field_index("path"), "path", pa.array(remote_paths, pa.string()))
    manifest = write_manifest(in_bucket, f"s3://{bucket}/manifests/pretrain.parquet")
    shards = pack_manifest(local, f"s3://{bucket}/packed", rows_per_shard=30)
    assert manifest == f"s3://{bucket}/manifests/pretrain.parquet" and len(shards) > 1
    assert all(key in s3.keys(bucket, "packed/") for key in (s.split("/", 3)[-1] for s in shards))
    assert open_source(manifest).layout == "imagefolder" and open_source(f"s3://{bucket}/packed").packed

    from_disk, from_manifest, from_packed = _read_in_a_task(s3.place, [local, manifest, f"s3://{bucket}/packed"])
    assert list(from_disk) == list(from_manifest) == list(from_packed) and from_disk
    for key, (images, masks) in from_disk.items():
        for other in (from_manifest, from_packed):
            assert np.array_equal(images, other[key][0]) and np.array_equal(masks, other[key][1])

    from pipelines.data.decode import decode_image

    assert decode_image(f"s3://{bucket}/images/no-such-image.jpg").reason == "missing"
    with pytest.raises(FileNotFoundError, match="no manifest or packed shards"):
        open_source(f"s3://{bucket}/nothing-here")


def _config(tmp_path: Path, synthetic_data: dict, storage_uri: str) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "unusable", "storage": storage_uri,
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "synthetic": {"root": str(Path(synthetic_data["pretrain"]).parent)},
        "pretrain": {"model": "mixmae_swin_micro_w8", "img_size": 64, "epochs": 1, "batch_size": 16,
                     "data": {"layout": "imagefolder", "root": "synthetic:pretrain"}},
    })


def test_a_bucket_that_cannot_be_used_is_one_message_before_any_stage(tmp_path, s3, synthetic_data, monkeypatch):
    """Unreachable, missing, or refusing the credentials: the run stops before Ray starts, with
    the URI and the cause; the command says it in one line with exit status 1."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/runs"
    with pytest.raises(StageError, match=rf"^storage {re.escape(missing)} cannot be used: bucket no-such-bucket-\w+ does not exist$"):
        run_pipeline(_config(tmp_path, synthetic_data, missing))

    (dead,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    with pytest.raises(StageError, match=rf"the endpoint http://127.0.0.1:{dead} is unreachable \(AWS_ENDPOINT_URL\)"):
        run_pipeline(_config(tmp_path, synthetic_data, "s3://any-bucket/runs"))

    refusing = MotoServer(tmp_path, enforce_auth=True).start()
    try:
        env = {**os.environ, **refusing.env}
        result = subprocess.run([str(BIN / "mixmae"), "pretrain", str(REPO_ROOT / "ray_configs/pipelines/smoke.yaml"),
                                 "--set", "storage=s3://runs/smoke", "--verbose"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        refusing.stop()
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "storage s3://runs/smoke cannot be used: access denied: check the credentials" in output
    assert "Traceback" not in output and "Started a local Ray instance" not in output
