"""What ``mixmae run`` shows a person: one line per event (a stage started, resumed, saved a
checkpoint, skipped images, finished with its headline metric, failed and why), live
progress bars on a terminal and a progress line every ``PROGRESS_EVERY_S`` seconds when the
output is a file or a CI log. Everything else the process and its children print (Ray's
logs, workers' output, MLflow's and the libraries' messages and warnings) goes to a log
file, whose path is shown once; ``--verbose`` leaves it all on the terminal instead.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: seconds between two progress lines when the output is not a terminal
PROGRESS_EVERY_S = 30.0


class RunConsole:
    """The console of one command. ``log_path``: where everything else goes (None: nowhere
    else, all stays on the terminal, as with ``--verbose``); ``copy_to``: where the log file is
    copied when the command ends (a storage in a bucket, which cannot be appended to)."""

    def __init__(self, log_path: Optional[Path] = None, copy_to: Optional[str] = None):
        self.log_path = log_path
        self.copy_to = copy_to
        self._saved: Optional[tuple[int, int]] = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            sys.stdout.flush()
            sys.stderr.flush()
            self._saved = (os.dup(1), os.dup(2))
            log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            # file descriptors, not sys.stdout: child processes (Ray's daemons and workers,
            # started later) inherit them, and so do C libraries writing to fd 1 or 2
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
        terminal = os.fdopen(os.dup(self._saved[0]), "w", buffering=1) if self._saved else sys.stdout
        self.terminal = terminal.isatty()
        self.console = Console(file=terminal, width=None if self.terminal else 200, soft_wrap=not self.terminal)
        self.progress: Optional[Progress] = None
        self._lock = threading.Lock()
        if log_path is not None:
            copied = f" (copied to {copy_to} at the end)" if copy_to else ""
            self.event(f"Ray, MLflow and library output: {log_path}{copied}")

    def event(self, message: str, style: str = "") -> None:
        """One line, timestamped."""
        with self._lock:
            stamp = time.strftime("%H:%M:%S")
            self.console.print(f"[dim]{stamp}[/] {f'[{style}]' if style else ''}{message}{'[/]' if style else ''}",
                               highlight=False)

    def start_progress(self) -> Optional[Progress]:
        """Live bars on a terminal (None otherwise: ``progress_line`` prints instead)."""
        if self.terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description:<16}[/]"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self.progress.start()
        return self.progress

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        """Give the terminal back its output."""
        self.stop_progress()
        if self._saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self._saved = None
        if self.copy_to is not None:
            from pipelines import storage

            try:
                storage.upload(self.log_path, self.copy_to)
            except OSError as exc:
                self.event(f"the log file stays at {self.log_path}: {storage.describe(self.copy_to, exc)}", "yellow")
            self.copy_to = None
