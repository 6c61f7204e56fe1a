"""Layout readers, manifests, packing, synthetic data and the ``mixmae data`` CLI (no Ray)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.data.layouts import LayoutError, read_layout
from pipelines.data.manifest import build_manifest, open_source, pack_manifest, split_counts, write_manifest
from pipelines.data.synth import SCALES, SYNTH_LAYOUTS, write_synthetic

TINY = SCALES["tiny"]


def _expected(name: str) -> dict[str, int]:
    if name in ("coco", "ade20k"):
        return {"train": TINY.dense_train, "val": TINY.dense_val}
    k = TINY.classes[name]
    return {"train": k * TINY.train_per_class, "val": k * TINY.val_per_class}


@pytest.mark.parametrize("name", list(SYNTH_LAYOUTS))
def test_every_layout_reads_its_synthetic_dataset(synthetic_data, name):
    table = build_manifest(SYNTH_LAYOUTS[name], synthetic_data[name])
    counts = split_counts(table)
    assert {s: c["images"] for s, c in counts.items()} == _expected(name)
    assert all(c["missing"] == 0 for c in counts.values())
    paths = table.column("path").to_pylist()
    assert all(Path(p).is_absolute() for p in paths)
    assert len(set(table.column("image_id").to_pylist())) == table.num_rows
    source = open_source(write_manifest(table, synthetic_data[name].parent / f"{name}.parquet"))
    assert source.layout == SYNTH_LAYOUTS[name] and not source.packed
    if name in TINY.classes:
        assert source.num_classes == TINY.classes[name]
        assert all(c["labelled"] == c["images"] and c["classes"] == TINY.classes[name] for c in counts.values())
    elif name == "coco":
        assert source.classes == ("circle", "square", "triangle") and source.category_ids == (1, 3, 7)
        assert all(c["annotations"] >= c["images"] and c["sized"] == c["images"] for c in counts.values())
    else:
        assert source.num_classes == 150
        assert all(Path(a).is_file() for a in table.column("annotation").to_pylist())


def test_places365_defaults_find_per_split_image_folders(synthetic_data):
    listing = read_layout("places", synthetic_data["places365"])
    folders = {r["split"]: Path(r["path"]).relative_to(synthetic_data["places365"]).parts[0] for r in listing.records}
    assert folders == {"train": "data_256", "val": "val_256"}
    assert listing.classes[0] == "a/place000"


def test_places_options_and_missing_references(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32)).save(images / f"{i}.jpg")
    (tmp_path / "my_list.txt").write_text("0.jpg 0\n1.jpg 1\n/2.jpg 1\ngone.jpg 0\n")
    table = build_manifest("places", tmp_path, "train", list_file="my_list.txt", image_dir="imgs")
    counts = split_counts(table)["train"]
    assert counts["images"] == 4 and counts["missing"] == 1 and counts["classes"] == 2
    with pytest.raises(LayoutError, match="give --split"):
        build_manifest("places", tmp_path, list_file="my_list.txt")
    with pytest.raises(LayoutError, match="do not apply"):
        build_manifest("imagefolder", tmp_path, "train", list_file="x")


def test_inat_reference_to_a_missing_image_is_kept_and_counted(tmp_path, synthetic_data):
    doc = json.loads((synthetic_data["inat2018"] / "val2018.json").read_text())
    doc["images"].append({"id": 10**6, "file_name": "train_val2018/nowhere.jpg", "width": 10, "height": 10})
    for image in doc["images"]:
        image["file_name"] = str(synthetic_data["inat2018"] / image["file_name"])
    (tmp_path / "val2018.json").write_text(json.dumps(doc))
    counts = split_counts(build_manifest("inat", tmp_path, "val"))["val"]
    assert counts["images"] == _expected("inat2018")["val"] + 1 and counts["missing"] == 1


def test_wrong_layout_is_a_clear_error(synthetic_data):
    with pytest.raises(LayoutError, match="COCO annotations folder"):
        read_layout("coco", synthetic_data["imagenet"])
    with pytest.raises(LayoutError, match="unknown layout"):
        read_layout("voc", synthetic_data["imagenet"])


def test_pack_holds_the_files_bytes_and_nulls_for_missing(tmp_path, synthetic_data):
    table = build_manifest("ade20k", synthetic_data["ade20k"], "val")
    manifest = write_manifest(table, tmp_path / "m.parquet")
    shards = pack_manifest(manifest, tmp_path / "packed", rows_per_shard=5)
    assert len(shards) == 4
    packed = open_source(tmp_path / "packed")
    assert packed.packed and packed.layout == "ade20k" and packed.annotation_kind == "label_map"
    rows = packed.table("val").to_pylist()
    assert [r["image_id"] for r in rows] == table.column("image_id").to_pylist()
    for r in rows:
        assert r["image_bytes"] == Path(r["path"]).read_bytes()
        assert r["annotation_bytes"] == Path(r["annotation"]).read_bytes()
    # repacking replaces the old shards instead of adding to them
    assert len(pack_manifest(manifest, tmp_path / "packed", rows_per_shard=16)) == 1
    assert len(open_source(tmp_path / "packed").files) == 1


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_synthetic_data_is_deterministic_and_reused(tmp_path, synthetic_data):
    again = write_synthetic(tmp_path / "again", "tiny", seed=0)
    assert _digest(again["coco"]) == _digest(synthetic_data["coco"])
    assert _digest(again["places365"]) == _digest(synthetic_data["places365"])
    stamp = (again["imagenet"] / "train").stat().st_mtime_ns
    assert write_synthetic(tmp_path / "again", "tiny", seed=0) == again
    assert (again["imagenet"] / "train").stat().st_mtime_ns == stamp
    other = write_synthetic(tmp_path / "again", "tiny", seed=1)
    assert _digest(other["coco"]) != _digest(synthetic_data["coco"])


def test_synthetic_ade_maps_have_background_objects_and_ignored_pixels(synthetic_data):
    folder = synthetic_data["ade20k"] / "ADEChallengeData2016" / "annotations" / "training"
    counts = np.zeros(256, np.int64)
    for path in folder.glob("*.png"):
        counts += np.bincount(np.asarray(Image.open(path)).ravel(), minlength=256)
    share = counts / counts.sum()
    assert share[1] > 0.6, "background class 1 should cover most pixels"
    assert 0.01 < share[0] < 0.2, "some pixels are 'other' (0) and ignored"
    assert all(share[k] > 0.01 for k in (2, 3, 4)) and counts[5:].sum() == 0


runner = CliRunner()


def test_cli_prepare_pack_and_synth(tmp_path, synthetic_data):
    out = tmp_path / "inat.parquet"
    result = runner.invoke(app, ["data", "prepare", "--layout", "inat", "--root", str(synthetic_data["inat2019"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and str(_expected("inat2019")["train"]) in result.output
    assert pq.read_table(out).num_rows == sum(_expected("inat2019").values())
    result = runner.invoke(app, ["data", "pack", "--manifest", str(out), "--out", str(tmp_path / "p"), "--rows-per-shard", "50"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "p").glob("part-*.parquet"))) == 3 and "packed 104 images" in result.output
    result = runner.invoke(app, ["data", "synth", "--out", str(synthetic_data["coco"].parent)])
    assert result.exit_code == 0 and "ade20k" in result.output
    result = runner.invoke(app, ["data", "prepare", "--layout", "coco", "--root", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 2 and "not found" in result.output


def test_cli_check_reports_every_file(bad_dataset, bad_images):
    result = runner.invoke(app, ["data", "check", "--layout", "places", "--root", str(bad_dataset), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    outcomes = {Path(f["path"]).name: (f["status"], f["reason"]) for f in report["files"]}
    assert outcomes == {**{n: (s, r) for n, (_, s, r) in bad_images.items()}, "good.jpg": ("ok", None)}
    summary = report["summary"]
    assert summary["attempted"] == len(bad_images) + 1 and summary["skipped"]["missing"] == 1
    text = runner.invoke(app, ["data", "check", "--layout", "places", "--root", str(bad_dataset)])
    assert "skipped: truncated" in text.output and "truncated.jpg" in text.output


def test_an_imagefolder_split_may_have_any_name_and_hidden_folders_are_not_splits(tmp_path):
    for split, label in (("train", "cat"), ("train_few", "dog"), ("val", "cat"), (".cache", "cat")):
        (tmp_path / split / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / label / "a.png")
    counts = split_counts(build_manifest("imagefolder", tmp_path))
    assert {split: c["images"] for split, c in counts.items()} == {"train": 1, "train_few": 1, "val": 1}
    few = read_layout("imagefolder", tmp_path, "train_few")
    assert few.classes == ["cat", "dog"] and [r["label"] for r in few.records] == [1]
