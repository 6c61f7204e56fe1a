"""A write-ahead log for what Ray Train workers send to MLflow, so a tracking server that is
down or slow never stalls or fails training.

Rank 0 of a stage appends each record (metrics of a step, tags, an artifact, the stage's
model) to ``<root>/tracking_spool/<run id>/records.jsonl`` and returns at once; a sender
thread delivers the records in order, with back-off while the server is away, and keeps the
offset of the last one delivered in ``sent``. ``root`` is the pipeline's storage when that is
a folder every node reaches, else a folder of the node's own (an object store cannot
append; :func:`pipelines.storage.local_root`). Records survive the worker: a restarted
attempt, the driver after the stage, ``mixmae sync`` or the next ``mixmae run`` deliver what
is left, each where it can read the folder. Two senders of one folder (a worker's and the driver's) deliver one at a time,
holding the folder's lock, so neither sends what the other has sent. Should a record still
go twice (a sender killed between sending and noting it), it is harmless: a metric carries
its timestamp from the moment it was logged, so MLflow drops the repeat; tags and artifacts
are overwritten with the same content; a model is looked up before it is created.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

RECORDS = "records.jsonl"
SENT = "sent"
RUN_FILE = "run.json"
LOCK = "deliver.lock"
REJECTED = "rejected.jsonl"
FILES = "files"
SPOOL_DIR = "tracking_spool"
#: back-off between delivery attempts while the server does not answer
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 15.0


def spool_root(root: Path) -> Path:
    return Path(root) / SPOOL_DIR


class Spool:
    """The records of one MLflow run. ``send`` delivers one record (raising if it cannot),
    ``retryable`` tells a failure worth retrying from a record the server refuses; ``say``
    is told once when the server stops answering and once when it is back."""

    def __init__(self, directory: Path, send: Callable[[dict[str, Any]], None],
                 say: Callable[[str], None] = print, retryable: Callable[[Exception], bool] = lambda exc: True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._send, self._say, self._retryable = send, say, retryable
        self._end_checked = False  # only the first append after opening can follow a torn line
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.unreachable_since: Optional[float] = None
        self.last_error = ""

    # ------------------------------------------------------------------ writing

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock, (self.dir / RECORDS).open("ab") as f:
            if not self._end_checked and f.tell() and not self._ends_a_line(f.name):
                line = b"\n" + line  # a writer killed mid-line left it torn: end it, it is no record
            self._end_checked = True
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._wake.set()

    @staticmethod
    def _ends_a_line(path: str) -> bool:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def keep(self, path: Path) -> str:
        """A copy of ``path`` in the spool (the original may be a temporary file), for a record to name."""
        target = self.dir / FILES / str(time.time_ns()) / Path(path).name  # the name is the artifact's
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        return str(target)

    # ------------------------------------------------------------------ reading

    def records(self, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(offset after the record, record)`` from byte ``start``; a line not yet ended is not
        yet a record, and one a killed writer left torn never is."""
        path = self.dir / RECORDS
        if not path.exists():
            return
        with path.open("rb") as f:
            f.seek(start)
            for raw in f:
                if not raw.endswith(b"\n"):
                    return
                start += len(raw)
                try:
                    record = json.loads(raw)
                except ValueError:  # the torn line of a writer killed mid-write
                    continue
                yield start, record

    def end(self) -> int:
        """The offset after the last record."""
        path = self.dir / RECORDS
        return path.stat().st_size if path.exists() else 0

    def sent_offset(self) -> int:
        try:
            return int((self.dir / SENT).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def pending(self) -> int:
        return sum(1 for _ in self.records(self.sent_offset()))

    def has_pending(self) -> bool:
        """Whether a record waits: reads one line, where ``pending`` parses the whole backlog."""
        path = self.dir / RECORDS
        if not path.exists():
            return False
        with path.open("rb") as f:
            f.seek(self.sent_offset())
            return f.readline().endswith(b"\n")

    def all_records(self) -> Iterator[dict[str, Any]]:
        """Every record ever appended, delivered or not."""
        return (record for _, record in self.records())

    # ------------------------------------------------------------------ delivering

    @contextmanager
    def _delivering(self):
        """The folder's delivery lock, across processes (advisory: every sender takes it)."""
        with (self.dir / LOCK).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def deliver(self) -> None:
        """Send every pending record in order. Raises at the first the server could take
        later (see ``retryable``); one it refuses is set aside in ``rejected.jsonl`` with the
        reason, said once each, and delivery goes on."""
        with self._delivering():
            self._deliver_pending()

    def _deliver_pending(self) -> None:
        for offset, record in self.records(self.sent_offset()):
            try:
                self._send(record)
            except Exception as exc:
                if self._retryable(exc):
                    raise
                with (self.dir / REJECTED).open("a") as f:
                    f.write(json.dumps({"record": record, "error": _describe(exc)}) + "\n")
                self._say(f"the tracking server refused a {record.get('kind')} record ({_describe(exc)}); "
                          f"it is kept in {self.dir / REJECTED}")
            tmp = self.dir / f"{SENT}.tmp"
            tmp.write_text(str(offset))
            os.replace(tmp, self.dir / SENT)

    def _attempt(self) -> bool:
        try:
            self.deliver()
        except Exception as exc:
            self.last_error = _describe(exc)
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
                self._say(f"tracking server not answering ({self.last_error}); training goes on, "
                          f"records wait in {self.dir}")
            return False
        if self.unreachable_since is not None:
            self._say(f"tracking server answers again after {time.monotonic() - self.unreachable_since:.0f} s; "
                      "spooled records delivered")
            self.unreachable_since = None
        return True

    def start(self) -> "Spool":
        """Deliver in the background from now on."""
        def loop() -> None:
            wait = RETRY_FIRST_S
            while not self._stop.is_set():
                self._wake.clear()
                if self._attempt():
                    wait = RETRY_FIRST_S
                    self._wake.wait()
                else:
                    self._stop.wait(wait)
                    wait = min(wait * 2, RETRY_MAX_S)

        self._thread = threading.Thread(target=loop, name="tracking-spool", daemon=True)
        self._thread.start()
        return self

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every record to be delivered; whether they were."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._thread is None:
                if self._attempt():
                    return True
            elif not self.has_pending():
                return True
            else:
                self._wake.set()
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(RETRY_FIRST_S, max(deadline - time.monotonic(), 0.0)))

    def close(self, timeout_s: float) -> bool:
        """Drain, then stop the sender; whether everything was delivered (what was not stays
        on disk for the next delivery)."""
        delivered = self.drain(timeout_s)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=RETRY_MAX_S)
        return delivered


def _describe(exc: Exception) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}"[:300]


def pending_spools(root: Path) -> list[Path]:
    """Spool folders under ``root`` with records not yet delivered."""
    folder = spool_root(root)
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if (d / RUN_FILE).exists() and Spool(d, send=print).has_pending())
