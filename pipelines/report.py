"""What a set of pipeline runs and sweep trials says, read from MLflow: which differences
between methods are above the run-to-run noise.

Reads every finished pipeline run of an experiment (sweep trials are pipeline runs too) and
its pretraining's k-NN accuracy along the way. Runs that differ only by seed form a group,
summarised by its mean and a t-interval across seeds, beside each run's own Wilson interval
over validation images; methods on the same encoder are compared seed by seed (runs with
the same seed see the same images in the same order, so the pairing removes the part of
the noise they share); and every method's k-NN curve is read at common pretraining FLOPs
budgets, the trade-off the MixMAE paper claims. :mod:`pipelines.report_files` writes it out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from itertools import combinations
from typing import Optional, Sequence

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipelines.stage_config import METHOD_RECIPES, PretrainStage
from pipelines.report_stats import Spread, interpolate_at, log_budgets, mean_by_seed, spread, verdict, wilson_interval
from pipelines.sweep import FLOPS_METRIC, PROBE_METRIC
from pipelines.tracking import KIND, STAGE

PRETRAIN_FLOPS = "pretrain.flops_train_total"
KNN_METRICS = ("knn_top1", "pretrain.eval_knn_top1")
KNN_IMAGES = "pretrain.eval_knn_images"
CURVE_ACCURACY, CURVE_FLOPS = "eval/knn_top1", "flops/train_total"
METHOD_COLOURS = {"mixmae": "tab:red", "simmim": "tab:blue", "mae": "tab:green", "beit": "tab:orange"}
#: Pretraining fields that change where and how visibly a run trains, not what it learns (a
#: run's workers draw their own random streams, as another seed would): runs that differ only
#: in them are one setting.
BOOKKEEPING_FIELDS = {"log_every_steps", "checkpoint_every_steps", "reconstructions", "scaling"}
SETTING_FIELDS = set(PretrainStage.model_fields) - BOOKKEEPING_FIELDS - {"seed"}


@dataclass
class ReportRow:
    run_id: str
    name: str
    flops: float
    accuracy: float
    mask_ratio: str
    epochs: str
    method: str = ""
    encoder: str = ""
    val_images: int = 0
    """Validation images the accuracy was scored on (0: unknown, no interval)."""
    pareto: bool = False
    seed: int = 0
    metric: str = ""
    setting: dict[str, str] = field(default_factory=dict)
    """The params that place the run in its group (see :func:`setting_of`)."""
    curve: list[tuple[float, float]] = field(default_factory=list)
    """Its pretraining's k-NN accuracy against pretraining FLOPs so far, FLOPs ascending."""
    group: str = ""

    def interval(self) -> tuple[float, float]:
        """Wilson's 95% interval of the accuracy as a binomial proportion over ``val_images``."""
        return wilson_interval(self.accuracy, self.val_images)


def accuracy_key(metrics: dict[str, float], requested: Optional[str]) -> Optional[str]:
    """The accuracy to report: the requested metric, else a sweep's probe accuracy, else the
    pretrained encoder's k-NN accuracy, else the first classification stage's top-1
    (alphabetically, so the choice is stable)."""
    if requested:
        return requested if requested in metrics else None
    for key in (PROBE_METRIC, *KNN_METRICS):
        if key in metrics:
            return key
    return next((k for k in sorted(metrics) if k.endswith(".val_top1")), None)


def _val_images(metrics: dict[str, float], key: str) -> int:
    """How many images the accuracy ``key`` was scored on."""
    if key in KNN_METRICS:
        return int(metrics.get(KNN_IMAGES, 0))
    stage = "probe" if key == PROBE_METRIC else key.split(".", 1)[0]
    return int(metrics.get(f"{stage}.data_val_images", 0))


def setting_of(params: dict[str, str], sweep: Optional[str]) -> dict[str, str]:
    """The params that define a run's group: what it was pretrained with, except the seed.

    A sweep trial: its sweep's name and the pretraining fields the sweep varied, which a trial
    carries under their bare names (``method``, ``model``, ``mask_ratio``...). The rest of its
    config is the sweep's base, the same for every trial, or follows from the method's recipe.
    A plain pipeline run: every ``pretrain.*`` param, since nothing tells which were chosen;
    those equal across runs split nothing, so a group is told by those that differ.
    Bookkeeping fields are left out: they change nothing that is learned.
    """
    if sweep is not None:
        return {"sweep": sweep, **{k: v for k, v in params.items() if k in SETTING_FIELDS}}
    return {k: v for k, v in params.items() if k.startswith("pretrain.") and _field(k) in SETTING_FIELDS}


def _field(param: str) -> str:
    """The pretraining field a param holds (``pretrain.data.root`` -> ``data``)."""
    return param.removeprefix("pretrain.").split(".", 1)[0]


def _row(run, metric: Optional[str], sweep_names: dict[str, str]) -> Optional[ReportRow]:
    metrics, params = run.data.metrics, run.data.params
    key = accuracy_key(metrics, metric)
    flops = metrics.get(FLOPS_METRIC, metrics.get(PRETRAIN_FLOPS))
    if key is None or flops is None:
        return None
    # a trial written before trials carried the param is still known by its parent, the sweep run
    sweep = params.get("sweep", sweep_names.get(run.data.tags.get(MLFLOW_PARENT_RUN_ID, "")))
    return ReportRow(
        run.info.run_id, run.info.run_name, flops, metrics[key],
        params.get("mask_ratio", params.get("pretrain.mask_ratio", "")),
        params.get("epochs", params.get("pretrain.epochs", "")),
        method=params.get("method", params.get("pretrain.method", "mixmae")),
        encoder=params.get("encoder", params.get("model", params.get("pretrain.model", ""))),
        val_images=_val_images(metrics, key),
        seed=int(float(params.get("seed", params.get("pretrain.seed", 0)))),
        metric=key,
        setting=setting_of(params, sweep),
    )


def collect(client: MlflowClient, experiment: str, metric: Optional[str] = None) -> tuple[list[ReportRow], str]:
    """The finished pipeline runs of ``experiment`` with pretraining FLOPs and an accuracy, each
    with its k-NN curve, Pareto front marked per method; and the accuracy's name."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} at {client.tracking_uri}")
    ids = [found.experiment_id]
    runs = client.search_runs(ids, f"tags.`{KIND}` = 'pipeline' and attributes.status = 'FINISHED'", max_results=5000)
    sweeps = {run.info.run_id: run.info.run_name for run in client.search_runs(ids, f"tags.`{KIND}` = 'sweep'")}
    rows = [row for row in (_row(run, metric, sweeps) for run in runs) if row is not None]
    if not rows:
        raise ValueError(
            f"experiment {experiment!r} has no finished pipeline run with pretraining FLOPs and "
            f"{metric or 'an accuracy metric'}"
        )
    curves = pretrain_curves(client, found.experiment_id, {row.run_id for row in rows})
    for row in rows:
        row.curve = curves.get(row.run_id, [])
    for method in {r.method for r in rows}:
        mark_pareto([r for r in rows if r.method == method])
    keys = {r.metric for r in rows}
    label = metric or (PROBE_METRIC if keys == {PROBE_METRIC} else " / ".join(sorted(keys)))
    return sorted(rows, key=lambda r: (r.method, r.flops)), label


def pretrain_curves(
    client: MlflowClient, experiment_id: str, pipeline_ids: set[str]
) -> dict[str, list[tuple[float, float]]]:
    """Per pipeline run, its pretraining stage's k-NN accuracy against the FLOPs spent so far:
    both are logged at the same steps, so they are paired by step."""
    stages = client.search_runs([experiment_id], f"tags.`{STAGE}` = 'pretrain'", max_results=5000)
    curves = {}
    for stage in stages:
        parent = stage.data.tags.get(MLFLOW_PARENT_RUN_ID)
        if parent not in pipeline_ids:
            continue
        accuracy = {m.step: m.value for m in client.get_metric_history(stage.info.run_id, CURVE_ACCURACY)}
        flops = {m.step: m.value for m in client.get_metric_history(stage.info.run_id, CURVE_FLOPS)} if accuracy else {}
        curve = sorted((flops[step], value) for step, value in accuracy.items() if flops.get(step, 0) > 0)
        if curve:
            curves[parent] = curve
    return curves


def mark_pareto(rows: Sequence) -> None:
    """Mark those on the front (runs or groups): none other has at most their FLOPs and more accuracy."""
    best = -math.inf
    for row in sorted(rows, key=lambda r: (r.flops, -r.accuracy)):
        if row.accuracy > best:
            row.pareto = True
            best = row.accuracy


def method_order(method: str) -> tuple[int, str]:
    """MixMAE first, then its baselines in the paper's order, so verdicts read the same way."""
    known = list(METHOD_COLOURS)
    return (known.index(method) if method in known else len(known), method)


@dataclass
class SeedGroup:
    """Runs that differ only by seed."""

    label: str
    method: str
    encoder: str
    metric: str
    context: tuple[tuple[str, str], ...]
    """What a paired comparison must match: the setting less method, encoder and what the
    method's recipe implies (see :func:`pairing_context`)."""
    runs: list[ReportRow]
    pareto: bool = False

    def accuracy_by_seed(self) -> dict[int, float]:
        return mean_by_seed([(r.seed, r.accuracy) for r in self.runs])

    @cached_property
    def spread(self) -> Spread:
        return spread(list(self.accuracy_by_seed().values()))

    @property
    def accuracy(self) -> float:
        return self.spread.mean

    @property
    def flops(self) -> float:
        return math.fsum(r.flops for r in self.runs) / len(self.runs)

    def wilson_half_width(self) -> Optional[float]:
        """The mean half-width of its runs' Wilson intervals: the noise of the validation images alone."""
        widths = [(high - low) / 2 for low, high in (r.interval() for r in self.runs if r.val_images)]
        return math.fsum(widths) / len(widths) if widths else None


def implied_by_recipe(method: str, param: str, text: str) -> bool:
    """Whether ``param`` holds what ``method``'s recipe gives it (then the method implies it)."""
    recipe = METHOD_RECIPES.get(method, {})
    if _field(param) not in recipe:
        return False
    try:
        logged = json.loads(text)
    except ValueError:
        logged = text
    value = recipe[_field(param)]
    return logged == (list(value) if isinstance(value, tuple) else value)


def pairing_context(row: ReportRow) -> tuple[tuple[str, str], ...]:
    """What two methods' runs must share to be compared: the setting less method and encoder,
    and less the fields at their method's recipe value (a method's mask ratio, epochs and
    learning rate come with it, as in the paper's comparisons). A field set apart from the
    recipe stays, so MixMAE and SimMIM at one chosen mask ratio pair, and not across ratios."""
    return tuple(sorted(
        (k, v) for k, v in row.setting.items()
        if _field(k) not in ("method", "model") and not implied_by_recipe(row.method, k, v)
    ))


def group_runs(rows: list[ReportRow]) -> list[SeedGroup]:
    """Rows by setting and accuracy metric; each row's ``group`` set to its group's label."""
    members: dict[tuple, list[ReportRow]] = {}
    for row in rows:
        members.setdefault((row.metric, tuple(sorted(row.setting.items()))), []).append(row)
    keys = {k for row in rows for k in row.setting}
    varying = sorted(k for k in keys if len({row.setting.get(k) for row in rows}) > 1)
    groups = []
    for runs in members.values():
        first = runs[0]
        shown = [f"{k.removeprefix('pretrain.')}={first.setting[k]}" for k in varying
                 if k in first.setting and _field(k) not in ("method", "model")]
        label = " ".join([first.method, first.encoder, *shown])
        for row in runs:
            row.group = label
        groups.append(SeedGroup(label, first.method, first.encoder, first.metric, pairing_context(first), runs))
    for method in {g.method for g in groups}:
        mark_pareto([g for g in groups if g.method == method])
    return sorted(groups, key=lambda g: (g.encoder, method_order(g.method), g.label))


@dataclass
class Comparison:
    """Two methods on one encoder, paired by seed: ``differences`` are first minus second."""

    first: SeedGroup
    second: SeedGroup
    differences: dict[int, float]

    @cached_property
    def spread(self) -> Spread:
        return spread(list(self.differences.values()))

    @property
    def verdict(self) -> str:
        return verdict(self.first.method, self.second.method, self.spread)


def compare_methods(groups: list[SeedGroup]) -> list[Comparison]:
    """Every pair of methods on the same encoder, metric and other settings that share a seed."""
    comparable: dict[tuple, list[SeedGroup]] = {}
    for group in groups:
        comparable.setdefault((group.encoder, group.metric, group.context), []).append(group)
    comparisons = []
    for members in comparable.values():
        for first, second in combinations(sorted(members, key=lambda g: method_order(g.method)), 2):
            if first.method == second.method:
                continue  # a setting written by older and newer runs in two forms: not a method contrast
            ours, theirs = first.accuracy_by_seed(), second.accuracy_by_seed()
            seeds = sorted(ours.keys() & theirs.keys())
            if seeds:
                comparisons.append(Comparison(first, second, {s: ours[s] - theirs[s] for s in seeds}))
    return comparisons


@dataclass
class BudgetPoint:
    """A group's k-NN accuracy at one pretraining FLOPs budget, one value per seed that reached it."""

    group: SeedGroup
    budget: float
    values: dict[int, float]
    short: list[int]
    """Seeds whose run has a curve but stopped before the budget."""

    @cached_property
    def spread(self) -> Spread:
        return spread(list(self.values.values()))


def at_budget(runs: Sequence[ReportRow], flops: float) -> dict[int, float]:
    """Each seed's k-NN accuracy at ``flops``, from the runs whose curve spans it."""
    values = ((r.seed, interpolate_at(r.curve, flops)) for r in runs if r.curve)
    return mean_by_seed([(seed, value) for seed, value in values if value is not None])


def budgets_of(runs: Sequence[ReportRow], count: int = 4) -> list[float]:
    """``count`` log-spaced budgets inside the FLOPs range that every method's runs reach: from
    the latest first evaluation of a method to the earliest last one, a method's range being
    the union of its runs' (a run that stopped short leaves its seed out where it stopped)."""
    spans: dict[str, tuple[float, float]] = {}
    for run in (r for r in runs if r.curve):
        low, high = spans.get(run.method, (math.inf, 0.0))
        spans[run.method] = (min(low, run.curve[0][0]), max(high, run.curve[-1][0]))
    if not spans:
        return []
    return log_budgets(max(low for low, _ in spans.values()), min(high for _, high in spans.values()), count)


def budget_points(groups: list[SeedGroup]) -> list[BudgetPoint]:
    """Per encoder, its budgets (those of all its methods' runs), read off each group's curves."""
    points = []
    for encoder in sorted({g.encoder for g in groups}):
        members = [g for g in groups if g.encoder == encoder and any(r.curve for r in g.runs)]
        for budget in budgets_of([r for g in members for r in g.runs]):
            for group in members:
                values = at_budget(group.runs, budget)
                short = sorted({r.seed for r in group.runs if r.curve} - values.keys())
                points.append(BudgetPoint(group, budget, values, short))
    return points


@dataclass
class Report:
    experiment: str
    metric: str
    runs: list[ReportRow]
    groups: list[SeedGroup]
    comparisons: list[Comparison]
    budgets: list[BudgetPoint]


def build_report(client: MlflowClient, experiment: str, metric: Optional[str] = None) -> Report:
    rows, label = collect(client, experiment, metric)
    groups = group_runs(rows)
    return Report(experiment, label, rows, groups, compare_methods(groups), budget_points(groups))
