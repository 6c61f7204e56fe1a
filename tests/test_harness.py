"""How our Ray drivers end: the test session with pytest's verdict and the ``mixmae`` command with its
status, their exit handlers run, whatever the interpreter's teardown would do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Native code that crashes while the interpreter finalizes, as a driver's leftover gRPC threads can.
CRASH_AT_FINALIZATION = """
import os, signal

class CrashAtFinalization:
    def __del__(self, kill=os.kill, pid=os.getpid(), sig=signal.SIGSEGV):
        kill(pid, sig)

KEEP = CrashAtFinalization()

def test_it():
    assert {verdict}
"""


@pytest.mark.parametrize("verdict, status", [(True, 0), (False, 1)])
def test_the_suite_exits_with_its_verdict_when_teardown_would_segfault(tmp_path, verdict, status):
    module = tmp_path / "test_crash_at_exit.py"
    module.write_text(CRASH_AT_FINALIZATION.format(verdict=verdict))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-o", "addopts=", "--rootdir", str(tmp_path), str(module)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == status, done.stdout + done.stderr
    assert ("1 passed" if verdict else "1 failed") in done.stdout


MIXMAE_CRASHING_AT_FINALIZATION = """
import atexit, sys
from pipelines.cli import main
atexit.register(print, "exit handlers ran")
sys.crash_at_finalization = CrashAtFinalization()  # held by a library's module, as native state is
sys.argv = ["mixmae", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("args, status", [(["--help"], 0), (["no-such-command"], 2)])
def test_mixmae_exits_with_its_status_when_teardown_would_segfault(args, status):
    crash = CRASH_AT_FINALIZATION.split("KEEP")[0]
    done = subprocess.run([sys.executable, "-c", crash + MIXMAE_CRASHING_AT_FINALIZATION, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("exit handlers ran")


def test_a_wait_that_times_out_names_the_last_error_of_its_check(tmp_path):
    """The tests' poll (``tests/servers.wait_for``) passes over a check that raises while what it
    waits for starts, and its timeout says what the check last raised."""
    from tests.servers import wait_for

    log = tmp_path / "server.log"
    log.write_text("listening soon\n")
    calls = []

    def check():
        calls.append(1)
        raise ConnectionRefusedError(f"attempt {len(calls)}")

    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with pytest.raises(TimeoutError, match=r"the check last raised ConnectionRefusedError: attempt \d+\):\nlistening soon"):
            wait_for(check, "a server", deadline_s=0.3, process=process, log=log, every_s=0.05)
    finally:
        process.communicate(b"")
    assert len(calls) > 1


def test_the_longest_modules_come_first():
    """`make test` deals the Ray tiers' modules to two workers in collection order (xdist's
    default would sort them by their number of tests): the modules named longest-first lead it,
    in that order, each keeping its own; each name is a module (a renamed one would fall back to
    file order unseen)."""
    from types import SimpleNamespace

    from tests.conftest import LONGEST_FIRST, longest_first

    tests = Path(__file__).parent
    ray_tiers = next(line for line in (tests.parent / "Makefile").read_text().splitlines() if '-m "not fast"' in line)
    assert "--dist loadfile --no-loadscope-reorder" in ray_tiers
    assert all((tests / name).is_file() for name in LONGEST_FIRST)
    collected = [SimpleNamespace(path=path, test=i) for path in sorted(tests.glob("test_*.py")) for i in range(2)]
    ordered = longest_first(collected)
    assert [item.path.name for item in ordered[: 2 * len(LONGEST_FIRST)]] == [name for name in LONGEST_FIRST for _ in range(2)]
    assert [item.test for item in ordered] == [0, 1] * len(collected[::2])
    rest = [item.path.name for item in ordered[2 * len(LONGEST_FIRST):]]
    assert rest == sorted(rest)
