"""Manifests (one parquet file of image references) and packed shards (parquet files that
also hold the encoded bytes). Both carry the same columns and metadata, so every dataset
builder reads either through :func:`open_source`. Either may be in a folder or an object store
(:mod:`pipelines.storage`), and so may the images a manifest names."""

from __future__ import annotations

import fnmatch
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.data.layouts import ADE_NUM_CLASSES, Listing, read_layout

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("path", pa.string()),
        ("split", pa.string()),
        ("label", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("annotation", pa.string()),
    ]
)
PACKED_SCHEMA = MANIFEST_SCHEMA.append(pa.field("image_bytes", pa.binary())).append(
    pa.field("annotation_bytes", pa.binary())
)
_META_KEY = b"mixmae.data"
_SHARD_GLOB = "part-*.parquet"
#: Rows per row group of a file that holds image bytes: the pipeline reads a row group at a
#: time (and deals them to the workers), so small groups keep those blocks small.
PACKED_ROW_GROUP = 64


def build_manifest(layout: str, root: str | Path, split: Optional[str] = None, **options: Any) -> pa.Table:
    """List a dataset (see :func:`pipelines.data.layouts.read_layout`) as a manifest table.

    ``image_id`` is the COCO image id for coco and the row number otherwise; the layout,
    class names and annotation kind travel in the schema metadata.
    """
    listing = read_layout(layout, root, split, **options)
    records = listing.records
    ids = [r.get("image_id", i) for i, r in enumerate(records)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{layout} under {root} lists duplicate image ids; give --split to list one split")
    columns = {name: [r.get(name) for r in records] for name in MANIFEST_SCHEMA.names}
    columns["image_id"] = ids
    return pa.table(columns, schema=MANIFEST_SCHEMA.with_metadata({_META_KEY: _metadata(listing)}))


def _metadata(listing: Listing) -> bytes:
    return json.dumps(
        {
            "layout": listing.layout,
            "classes": listing.classes,
            "annotation_kind": listing.annotation_kind,
            "category_ids": listing.category_ids,
            "ignored": listing.ignored,
        }
    ).encode()


def write_manifest(table: pa.Table, out: str | Path) -> str:
    """Write ``table`` to ``out`` (a path or an object store URI); its location."""
    location = storage.absolute(str(out))
    fs, path = storage.resolve(location)
    if fs.type_name == "local":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    row_group = PACKED_ROW_GROUP if "image_bytes" in table.column_names else None
    pq.write_table(table, path, filesystem=fs, row_group_size=row_group)
    return location


def read_parquet(location: str, **kwargs: Any) -> pa.Table:
    """``pq.read_table`` of a file in a folder or an object store."""
    fs, path = storage.resolve(location)
    return pq.read_table(path, filesystem=fs, **kwargs)


def read_schema(location: str) -> pa.Schema:
    fs, path = storage.resolve(location)
    return pq.read_schema(path, filesystem=fs)


def parquet_file(location: str) -> pq.ParquetFile:
    fs, path = storage.resolve(location)
    return pq.ParquetFile(path, filesystem=fs)


def shard_files(location: str) -> list[str]:
    """The packed shards (``part-*.parquet``) in folder ``location``, sorted (none if it is no folder)."""
    return [f for f in storage.files(location) if fnmatch.fnmatch(storage.name(f), _SHARD_GLOB)]


@dataclass(frozen=True)
class DataSource:
    """A manifest file or a folder of packed shards, opened for reading."""

    files: tuple[str, ...]
    packed: bool
    layout: str
    classes: tuple[str, ...]
    annotation_kind: str
    category_ids: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        """Classification: number of labels; coco: categories (without background); ade20k: 150."""
        return ADE_NUM_CLASSES if self.layout == "ade20k" else len(self.classes)

    def table(self, split: Optional[str] = None, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """The rows of ``split`` (all when None) read in the driver with pyarrow."""
        tables = [
            read_parquet(f, columns=list(columns) if columns else None, filters=_split_filter(split))
            for f in self.files
        ]
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _split_filter(split: Optional[str]):
    return None if split is None else pc.field("split") == split


def open_source(source: "str | Path | DataSource") -> DataSource:
    """Open a manifest (``.parquet`` file) or a folder of packed shards (``part-*.parquet``)."""
    if isinstance(source, DataSource):
        return source
    location = storage.absolute(str(source))
    files = shard_files(location)
    if not files:
        if not storage.exists(location):
            raise FileNotFoundError(f"no manifest or packed shards at {location}")
        if not storage.is_file(location):
            raise FileNotFoundError(f"no packed shards ({_SHARD_GLOB}) in {location}")
        files = [location]
    schema = read_schema(files[0])
    meta = json.loads((schema.metadata or {}).get(_META_KEY, b"{}"))
    if "layout" not in meta:
        raise ValueError(f"{files[0]} is not a mixmae manifest (run `mixmae data prepare`)")
    return DataSource(
        tuple(files),
        "image_bytes" in schema.names,
        meta["layout"],
        tuple(meta["classes"]),
        meta["annotation_kind"],
        tuple(meta.get("category_ids", [])),
    )


def split_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """Per split: images, labelled images, distinct labels, files missing on disk,
    COCO annotations and images with a known size (what ``data prepare`` prints)."""
    out: dict[str, dict[str, int]] = {}
    for split in sorted(set(table.column("split").to_pylist())):
        rows = table.filter(pc.field("split") == split)
        labels = [x for x in rows.column("label").to_pylist() if x >= 0]
        annotations = [a for a in rows.column("annotation").to_pylist() if a]
        out[split] = {
            "images": rows.num_rows,
            "labelled": len(labels),
            "classes": len(set(labels)),
            "missing": sum(not Path(p).exists() for p in rows.column("path").to_pylist()),
            "annotations": sum(len(json.loads(a)) for a in annotations if a.startswith("[")),
            "sized": rows.num_rows - rows.column("width").null_count,
        }
    return out


def _read_all(paths: Iterable[Optional[str]], pool: ThreadPoolExecutor) -> list[Optional[bytes]]:
    """File contents; None where the file is missing (an empty file stays b"" so it is
    skipped as ``empty``, as it would be when read from its path)."""

    def one(path: Optional[str]) -> Optional[bytes]:
        try:
            return storage.read_bytes(path) if path is not None else None
        except (FileNotFoundError, IsADirectoryError):
            return None

    return list(pool.map(one, paths))


def pack_manifest(manifest: str | Path, out: str | Path, rows_per_shard: int = 1000, threads: int = 16) -> list[str]:
    """Write ``out/part-NNNNN.parquet`` shards (``out`` a folder or an object store URI) holding
    the manifest rows plus the encoded image bytes (and label-map bytes for ade20k). Missing
    files get null bytes, which the pipeline skips and counts as ``missing``. Shards from an
    earlier pack of ``out`` are replaced. Returns the shards' locations.
    """
    source = open_source(manifest)
    if source.packed:
        raise ValueError(f"{manifest} is already packed")
    table = source.table()
    out = storage.absolute(str(out))
    for old in shard_files(out):
        storage.delete(old)
    schema = PACKED_SCHEMA.with_metadata(read_schema(source.files[0]).metadata)
    label_maps = source.annotation_kind == "label_map"
    shards = []
    with ThreadPoolExecutor(threads) as pool:
        for n, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
            rows = table.slice(start, rows_per_shard)
            images = _read_all(rows.column("path").to_pylist(), pool)
            annotations = rows.column("annotation").to_pylist()
            label_bytes = _read_all(annotations, pool) if label_maps else [None] * rows.num_rows
            shard = rows.append_column("image_bytes", pa.array(images, pa.binary()))
            shard = shard.append_column("annotation_bytes", pa.array(label_bytes, pa.binary()))
            shards.append(write_manifest(shard.cast(schema), storage.join(out, f"part-{n:05d}.parquet")))
    return shards
