"""Where a pipeline keeps what its stages share: a local folder (a shared filesystem on a
cluster) or an object store (``s3://bucket/prefix``; ``gs://`` where pyarrow serves it),
behind pyarrow's filesystems, the ones Ray Train and Ray Data use.

A location is a string: an absolute local path or a URI. Every use of ``storage``, a data
root, a manifest or a checkpoint goes through the helpers here, so a local path behaves as
it always did and an object store works the same way from any node.

Credentials and the endpoint come only from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` or a node's role, ``AWS_ENDPOINT_URL[_S3]``,
``AWS_DEFAULT_REGION``/``AWS_REGION``; for GCS ``GOOGLE_APPLICATION_CREDENTIALS``), never from a
config: the filesystem is built without keys (the SDK reads them on each node), so pickling it
to Ray's processes carries none. pyarrow is given the endpoint itself: some of its versions
ignore ``AWS_ENDPOINT_URL``.

Object stores cannot append, and a node cannot see another node's disk: what a process appends
to (the tracking spool) and the driver's log file live in :func:`local_root`, a folder of the
node's own, which for a local storage is the storage itself.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlsplit

import pyarrow.fs as pafs

#: Schemes served by pyarrow's filesystems with the same code
REMOTE_SCHEMES = ("s3", "gs")
_TYPE_SCHEMES = {"s3": "s3", "gcs": "gs"}
#: Where the object store is (no secret): what a run takes to the processes of a cluster it joins
#: (its Train controller and workers, their Ray Data tasks), since Ray does not hand a driver's
#: environment to one. Keys never travel so: Ray's runtime env agent logs every runtime env it
#: creates, so each node holds its own (a local cluster started here inherits this process's).
PLACE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL")
PROBE_PREFIX = ".mixmae-probe-"
LOCAL_DIR_ENV = "MIXMAE_LOCAL_DIR"


class StorageError(RuntimeError):
    """An object store that cannot be used; the message names the URI and the cause."""


def is_remote(location: str) -> bool:
    return urlsplit(str(location)).scheme in REMOTE_SCHEMES


def check_uri(location: str) -> str:
    """``location`` unchanged, unless it is a URI that carries credentials or options (those
    come from the environment) or one of a scheme this project does not serve. The message
    never repeats the URI: it may hold a key."""
    parts = urlsplit(location)
    if "://" in location and parts.scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{parts.scheme}:// is not served; object storage is one of {[s + '://' for s in REMOTE_SCHEMES]}")
    if parts.scheme in REMOTE_SCHEMES and ("@" in parts.netloc or parts.query):
        raise ValueError(f"{parts.scheme}://{parts.hostname}/...: credentials and endpoint come from the environment "
                         "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), never from a config")
    return location


def absolute(location: str) -> str:
    """A local path made absolute (Ray workers run in other directories); a URI as it is."""
    if is_remote(location):
        return str(location).rstrip("/")
    return str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location, *parts))


def name(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[0] if is_remote(location) else str(Path(location).parent)


@functools.lru_cache(maxsize=8)
def _s3(endpoint: Optional[str], region: Optional[str]) -> pafs.FileSystem:
    options = {}
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme)
    return pafs.S3FileSystem(region=region, connect_timeout=10, **options)


def filesystem(location: str) -> pafs.FileSystem:
    """The filesystem of ``location``, built from the current environment (one per endpoint)."""
    scheme = urlsplit(str(location)).scheme
    if scheme == "s3":
        env = os.environ.get
        return _s3(env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"), env("AWS_REGION") or env("AWS_DEFAULT_REGION"))
    if scheme == "gs":
        return pafs.FileSystem.from_uri(str(location))[0]
    return pafs.LocalFileSystem()


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)``: for pyarrow's readers and writers and Ray's ``storage_path``."""
    if is_remote(location):
        parts = urlsplit(str(location))
        return filesystem(location), f"{parts.netloc}{parts.path}".rstrip("/")
    return filesystem(location), absolute(location)


def location_of(fs: pafs.FileSystem, path: str) -> str:
    """The location of ``path`` in ``fs`` (a Ray ``Checkpoint``'s ``filesystem`` and ``path``)."""
    scheme = _TYPE_SCHEMES.get(fs.type_name)
    return f"{scheme}://{path}" if scheme else path


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def _entries(location: str, kind: pafs.FileType) -> list[str]:
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)) if info.type == kind)


def folders(location: str) -> list[str]:
    """Names of the folders directly under ``location``, sorted (none if it is not a folder)."""
    return _entries(location, pafs.FileType.Directory)


def files(location: str) -> list[str]:
    """Locations of the files directly under ``location``, sorted (none if it is not a folder)."""
    return [join(location, entry) for entry in _entries(location, pafs.FileType.File)]


def read_bytes(location: str) -> bytes:
    if not is_remote(location):  # a folder read as a file is an IsADirectoryError, as Python says it
        return Path(location).read_bytes()
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def _make_parent(fs: pafs.FileSystem, path: str) -> None:
    """Local folders must exist before a file is written in them; object stores have none."""
    if fs.type_name == "local":
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)


def write_bytes(location: str, data: bytes) -> None:
    fs, path = resolve(location)
    _make_parent(fs, path)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def size(location: str) -> int:
    fs, path = resolve(location)
    return fs.get_file_info(path).size


def delete(location: str) -> None:
    """Remove a file; one that is not there is fine."""
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def copy_tree(source: str, destination: str) -> None:
    """Copy a folder within a storage (object stores copy server-side where they can)."""
    fs, src = resolve(source)
    _, dst = resolve(destination)
    _make_parent(fs, dst + "/")
    pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)


def upload(local: Path, location: str) -> None:
    fs, path = resolve(location)
    _make_parent(fs, path)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(location: str, destination: Path) -> Path:
    """A file, or every file of a folder, copied to ``destination`` (a folder it creates)."""
    fs, path = resolve(location)
    destination.mkdir(parents=True, exist_ok=True)
    if fs.get_file_info(path).type == pafs.FileType.File:
        target = destination / name(location)
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return target
    pafs.copy_files(path, str(destination), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return destination


@contextmanager
def fetched(location: str) -> Iterator[Path]:
    """A local path holding ``location`` (a file or a folder) while the block runs: the path
    itself when it is local, else a temporary copy."""
    if not is_remote(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="mixmae-") as tmp:
        yield download(location, Path(tmp) / "fetched")


def local_copy(location: str) -> Path:
    """A local path holding ``location``'s file: the file itself when it is local, else a copy
    cached on this node (a new copy when the object changes size or time)."""
    if not is_remote(location):
        return Path(absolute(location))
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location} does not exist")
    key = hashlib.sha1(f"{location}:{info.size}:{info.mtime_ns}".encode()).hexdigest()[:16]
    target = node_folder() / "cache" / key / name(location)
    if not target.exists():
        staging = download(location, target.parent.with_name(f"{key}.{uuid.uuid4().hex}")).parent
        try:
            staging.replace(target.parent)  # whole or not at all: a concurrent reader never sees a part
        except OSError:  # another process of this node copied it first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def node_folder() -> Path:
    """This node's own folder: ``MIXMAE_LOCAL_DIR`` (a volume that outlives the node's
    processes, say), else ``mixmae`` in its temporary directory."""
    return Path(os.environ.get(LOCAL_DIR_ENV) or Path(tempfile.gettempdir()) / "mixmae")


def local_root(location: str) -> Path:
    """This node's folder for what cannot live on object storage (the tracking spool, the
    driver's log file): the storage itself when it is local, else a folder of
    :func:`node_folder` named after the storage."""
    if not is_remote(location):
        return Path(absolute(location))
    return node_folder() / hashlib.sha1(absolute(location).encode()).hexdigest()[:16]


def runtime_env() -> Optional[dict]:
    """The variables of :data:`PLACE_ENV` set in this process as a Ray runtime env (None when
    none is set), for a cluster whose processes were started without them."""
    env = {key: os.environ[key] for key in PLACE_ENV if os.environ.get(key)}
    return {"env_vars": env} if env else None


def describe(location: str, exc: BaseException) -> str:
    """What went wrong reaching ``location``, in words a person acts on."""
    text = str(exc)
    scheme = urlsplit(str(location)).scheme
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not connect" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or f"{scheme}'s default"
        cause = f"the endpoint {endpoint} is unreachable (AWS_ENDPOINT_URL)"
    elif "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "bucket does not exist" in text:
        cause = f"bucket {urlsplit(str(location)).netloc} does not exist"
    elif any(word in text for word in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                                        "AccessDenied", "InvalidAccessKeyId", "Forbidden", "credentials")):
        cause = ("access denied: check the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                 "or the node's role) and the bucket's policy")
    else:
        cause = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return f"storage {location} cannot be used: {cause}"


def probe(location: str) -> None:
    """Write, read back and delete a small object under ``location`` (nothing for a local
    folder): a store that is unreachable, refuses access or has no such bucket fails here, in
    one message, before any Ray process depends on it."""
    if not is_remote(location):
        return
    target = join(location, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        write_text(target, "mixmae")
        if read_text(target) != "mixmae":
            raise OSError("an object written did not read back")
        delete(target)
    except OSError as exc:
        raise StorageError(describe(location, exc)) from None


def train_storage(location: str) -> dict:
    """Ray's ``storage_path`` and ``storage_filesystem`` (Train's and Tune's ``RunConfig``) for ``location``."""
    if not is_remote(location):
        return {"storage_path": absolute(location)}
    fs, path = resolve(location)
    return {"storage_path": path, "storage_filesystem": fs}
