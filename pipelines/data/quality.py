"""Counting what the data pipeline converted or skipped, and failing loudly when it is too much.

Decode tasks fill a :class:`Tally` per batch and send it, fire-and-forget, to the
pipeline's :class:`SkipCounter` actor through their stage's :class:`StageSkips`. The
training loop reads ``snapshot()`` at logging steps, logs it and calls
:func:`check_skip_threshold`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import ray

from pipelines.data.decode import DecodeResult

log = logging.getLogger(__name__)

#: A pair is dropped when one image is skipped; its healthy partner lands here. Not a data error.
PARTNER_SKIPPED = "partner_skipped"
EXAMPLES_PER_REASON = 5


class DataQualityError(RuntimeError):
    """Too large a share of the input images could not be used."""


class Tally:
    """Outcome counts of decoded images: every attempted image is ok, converted or skipped[reason]."""

    def __init__(self) -> None:
        self.attempted = 0
        self.ok = 0
        self.converted = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, path: str, result: DecodeResult) -> None:
        self.count(path, result.status, result.reason)

    def count(self, path: str, status: str, reason: Optional[str] = None) -> None:
        if status == "skipped":
            self.skip(path, reason or "unknown")
            return
        self.attempted += 1
        if status == "converted":
            self.converted += 1
        else:
            self.ok += 1

    def skip(self, path: str, reason: str) -> None:
        """Count an attempted image as skipped (decode failures, bad label maps, dropped partners)."""
        self.attempted += 1
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(str(path))

    def merge(self, other: dict[str, Any]) -> None:
        self.attempted += other["attempted"]
        self.ok += other["ok"]
        self.converted += other["converted"]
        self.skipped.update(other["skipped"])
        for reason, paths in other["examples"].items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(paths[: EXAMPLES_PER_REASON - len(mine)])

    def as_dict(self) -> dict[str, Any]:
        return {
            "attempted": self.attempted,
            "ok": self.ok,
            "converted": self.converted,
            "skipped": dict(self.skipped),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def flush(self, skips: Optional["StageSkips"]) -> None:
        """Send the counts to ``skips`` without waiting (or log skips when there is none)."""
        if not self.attempted:
            return
        if skips is not None:
            skips.add(self.as_dict())
        elif self.skipped:
            log.warning("data pipeline skipped images (no skip counter attached): %s", self.as_dict())


@ray.remote(num_cpus=0)
class SkipCounter:
    """Totals of decode outcomes, one tally per key (a stage run). One actor serves a whole
    pipeline: an actor is a process, with seconds of start-up, so not one per stage."""

    def __init__(self) -> None:
        self._tallies: dict[str, Tally] = {}

    def add(self, key: str, counts: dict[str, Any]) -> None:
        self._tallies.setdefault(key, Tally()).merge(counts)

    def snapshot(self, key: str) -> dict[str, Any]:
        """``{attempted, ok, converted, skipped: {reason: n}, examples: {reason: [paths]}}``."""
        return self._tallies.get(key, Tally()).as_dict()


def start_skip_counter(name: str) -> "ray.actor.ActorHandle":
    """Get or create the named :class:`SkipCounter` (use a name unique to the pipeline run).

    It lives as long as the handle the creating driver keeps, on the driver's node (a node
    lost takes only its workers, whose stage resumes, not the pipeline's counts); hand stages
    a :class:`StageSkips` each.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return SkipCounter.options(name=name, get_if_exists=True, scheduling_strategy=here).remote()


@lru_cache(maxsize=8)
def _actor(name: str) -> "ray.actor.ActorHandle":
    return ray.get_actor(name)


@dataclass(frozen=True)
class StageSkips:
    """One stage run's tally on the named :class:`SkipCounter`: what dataset builders and the
    train loop hold. Two strings, so it pickles into every decode task for nothing."""

    counter: str
    key: str

    def add(self, counts: dict[str, Any]) -> None:
        """Send counts without waiting."""
        _actor(self.counter).add.remote(self.key, counts)

    def snapshot(self) -> dict[str, Any]:
        return ray.get(_actor(self.counter).snapshot.remote(self.key))


def check_skip_threshold(
    snapshot: dict[str, Any], max_skip_fraction: float = 0.01, min_attempted: int = 100
) -> None:
    """Raise :class:`DataQualityError` when skipped / attempted exceeds ``max_skip_fraction``.

    Dropped partners (``partner_skipped``) are not data errors and do not count. Nothing is
    judged before ``min_attempted`` images were tried, so one bad file among the first few
    does not stop a run.
    """
    attempted = snapshot["attempted"]
    bad = {reason: n for reason, n in snapshot["skipped"].items() if reason != PARTNER_SKIPPED and n}
    if attempted < max(1, min_attempted) or not bad:
        return
    fraction = sum(bad.values()) / attempted
    if fraction <= max_skip_fraction:
        return
    details = "; ".join(
        f"{reason}: {n} (e.g. {', '.join(snapshot['examples'].get(reason, [])[:3]) or 'no example recorded'})"
        for reason, n in sorted(bad.items(), key=lambda item: -item[1])
    )
    raise DataQualityError(
        f"{sum(bad.values())} of {attempted} images ({fraction:.1%}) were skipped, above the "
        f"{max_skip_fraction:.1%} limit. {details}. Run `mixmae data check` on the dataset for every file."
    )
