"""The storage helpers on local paths (a local storage behaves as it always did), what a
config accepts as object storage, and where a sweep's trials keep their checkpoints. (An S3
server's buckets are used in test_object_storage.py, and by the resume test here.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import storage
from pipelines.config import REPO_ROOT, ConfigError, load_config
from pipelines.sweep import load_sweep, trial_config


def test_a_local_storage_is_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = storage.absolute("runs")
    assert root == str(tmp_path / "runs") and not storage.is_remote(root)
    assert storage.local_root("runs") == tmp_path / "runs"  # the spool and logs stay in the storage
    assert storage.train_storage("runs") == {"storage_path": str(tmp_path / "runs")}
    storage.probe(root)  # nothing to probe on a local folder
    meta = storage.join(root, "trainer", "checkpoint_1", "meta.json")
    storage.write_text(meta, "{}")
    storage.write_text(storage.join(root, "trainer", "checkpoint_0", "meta.json"), "{}")
    assert storage.folders(storage.join(root, "trainer")) == ["checkpoint_0", "checkpoint_1"]
    assert storage.files(storage.join(root, "trainer", "checkpoint_1")) == [meta]
    assert storage.folders(storage.join(root, "nothing")) == [] and storage.files(meta) == []
    storage.copy_tree(storage.parent(meta), storage.join(root, "aside", "checkpoint_1"))
    assert storage.read_text(storage.join(root, "aside", "checkpoint_1", "meta.json")) == "{}"
    with storage.fetched(meta) as path:
        assert path == Path(meta)  # read where it is, not copied
    storage.delete(meta)
    storage.delete(meta)  # already gone: fine
    assert not storage.exists(meta)


def test_a_bucket_is_named_by_its_uri_and_only_the_environment_says_how_to_reach_it(monkeypatch):
    for name in storage.PLACE_ENV:
        monkeypatch.delenv(name, raising=False)
    assert storage.runtime_env() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    location = storage.absolute("s3://bucket/runs/")
    assert location == "s3://bucket/runs" and storage.join(location, "a", "b") == "s3://bucket/runs/a/b"
    assert storage.name(location) == "runs" and storage.parent(location) == "s3://bucket"
    assert storage.location_of(*storage.resolve(storage.join(location, "x"))) == "s3://bucket/runs/x"
    options = storage.train_storage(location)
    assert options["storage_path"] == "bucket/runs"
    assert "s3cr3t" not in repr(options["storage_filesystem"].__reduce__())  # keys are read on each node
    # where the store is travels to a cluster the run joins; a key never does (Ray logs runtime envs)
    assert storage.runtime_env() == {"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}}
    monkeypatch.setenv("MIXMAE_LOCAL_DIR", "/node/own")
    local = storage.local_root(location)
    assert local.parent == Path("/node/own") and local != storage.local_root("s3://bucket/other")


@pytest.mark.parametrize("uri", ["s3://KEY:s3cr3t@bucket/runs", "s3://bucket/runs?secret_key=s3cr3t",
                                 "ftp://u:s3cr3t@host/runs"])
def test_a_config_refuses_credentials_and_options_in_a_uri_without_repeating_them(uri):
    for setting in (f"storage={uri}", f"pretrain.data.root={uri}"):
        with pytest.raises(ConfigError, match="environment|not served") as error:
            load_config(None, [setting], pretrain_only=True)
        assert "s3cr3t" not in str(error.value)


def test_a_sweeps_trials_keep_their_checkpoints_in_the_bucket(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, base = load_sweep(REPO_ROOT / "ray_configs/sweeps/mask_ratio_epochs.yaml",
                            ["storage=s3://bucket/sweeps", "overrides=[storage=s3://bucket/runs]"])
    assert spec.storage == "s3://bucket/sweeps" and base.storage == "s3://bucket/runs"
    resolved = base.resolved()  # as the trials get it
    assert resolved.storage == "s3://bucket/runs" and resolved.synthetic.root == str(tmp_path / ".mixmae/synthetic")
    trial = trial_config(resolved, spec, {key: space.grid[0] for key, space in spec.search.items()}, seed=0)
    assert trial.storage == "s3://bucket/runs"


@pytest.mark.parametrize("where", ["folder", pytest.param("bucket", marks=pytest.mark.cluster)])
def test_resuming_passes_over_a_truncated_newest_checkpoint_and_keeps_a_copy_of_it(where, tmp_path, request, monkeypatch):
    """In a local storage and in a bucket (moto's S3 server): the newest checkpoint that loads
    is the one a resume starts from, and each passed over is named and copied aside as it was
    found. (A whole run resumed from a bucket: test_determinism.py.)"""
    import json
    import uuid

    import torch

    from mixmae_core.checkpoint import save_state_dict
    from pipelines.stages.checkpoints import CORRUPT_DIR, META_FILE, MODEL_FILE, STATE_FILE, newest_loadable

    runs = str(tmp_path / "runs")
    if where == "bucket":
        s3 = request.getfixturevalue("s3")
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        runs = f"s3://{s3.bucket(f'resume-{uuid.uuid4().hex[:8]}')}/runs"
    trainer = storage.join(runs, "pipeline-pretrain")
    written = tmp_path / "written"
    written.mkdir()
    for step in (2, 4):
        name = f"checkpoint_2026-12-06_00-00-0{step}"
        save_state_dict(written / MODEL_FILE, {"w": torch.full((64,), float(step))})
        torch.save({"optimizer": {}}, written / STATE_FILE)
        (written / META_FILE).write_text(json.dumps({"stage": "pretrain", "step": step}))
        for file in written.iterdir():
            storage.upload(file, storage.join(trainer, name, file.name))
    newest = storage.join(trainer, name)
    model = storage.read_bytes(storage.join(newest, MODEL_FILE))
    half = len(model) // 2
    storage.write_bytes(storage.join(newest, MODEL_FILE), model[:half])

    skipped: list[str] = []
    found = newest_loadable(newest, skipped, keep_corrupt=True)
    assert found.meta["step"] == 2 and torch.equal(found.model["w"], torch.full((64,), 2.0))
    assert len(skipped) == 1 and skipped[0].startswith(f"{name}: ")
    assert storage.size(storage.join(runs, CORRUPT_DIR, "pipeline-pretrain", name, MODEL_FILE)) == half
    assert newest_loadable(storage.join(trainer, "checkpoint_2026-12-06_00-00-02"), [], keep_corrupt=False).meta["step"] == 2


def test_a_stage_after_the_pretraining_in_its_group_finds_the_encoder_of_its_newest_final_checkpoint(tmp_path):
    """What a sweep trial's probe starts from, in its worker group's folder: the encoder of the
    pretraining's newest final checkpoint; not a periodic one, not another stage's, not one
    whose meta is being written; none before the pretraining has finished."""
    import json

    from pipelines.stages.checkpoints import ENCODER_FILE, META_FILE, final_encoder

    trainer = tmp_path / "run-pretrain+probe"
    written = [  # (folder, meta or None while being written)
        ("checkpoint_2026-12-06_00-00-01", {"stage": "pretrain", "step": 5, "final": False}),
        ("checkpoint_2026-12-06_00-00-02", {"stage": "pretrain", "step": 10, "final": True}),
        ("checkpoint_2026-12-06_00-00-03", {"stage": "probe", "step": 4, "final": True}),
        ("checkpoint_2026-12-06_00-00-04", None),
    ]
    assert final_encoder(str(trainer), "pretrain") is None  # no folder yet
    for name, meta in written:
        (trainer / name).mkdir(parents=True)
        (trainer / name / ENCODER_FILE).write_bytes(b"weights")
        if meta is not None:
            (trainer / name / META_FILE).write_text(json.dumps(meta))
    assert final_encoder(str(trainer), "pretrain") == str(trainer / "checkpoint_2026-12-06_00-00-02" / ENCODER_FILE)
    assert final_encoder(str(trainer), "probe") == str(trainer / "checkpoint_2026-12-06_00-00-03" / ENCODER_FILE)
    assert final_encoder(str(trainer), "tokenizer") is None
