"""`mixmae report` decides: groups over seeds, methods paired by seed, k-NN accuracy at common
FLOPs budgets, read from a real MLflow store written here with known numbers."""

from __future__ import annotations

import csv
import json
import math

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.report import build_report
from pipelines.report_files import TABLES, run_report
from pipelines.report_stats import interpolate_at, log_budgets, spread, verdict
from pipelines.tracking import KIND, STAGE

T_975 = {1: 12.706205, 2: 4.302653}  # Student t quantiles, from a table
SWIN, PVT, TWINS = "mixmae_swin_micro_w8", "mixmae_pvt_v2_micro", "mixmae_twins_svt_micro"
PROBE = {  # (encoder, method): probe top-1 by seed
    (SWIN, "mixmae"): [0.60, 0.62, 0.64], (SWIN, "simmim"): [0.50, 0.53, 0.53],  # mixmae clearly above
    (PVT, "mixmae"): [0.55, 0.50, 0.60], (PVT, "simmim"): [0.52, 0.56, 0.54],  # within noise
    (TWINS, "mixmae"): [0.58], (TWINS, "simmim"): [0.51],  # one seed
}
RECIPE_MASK = {"mixmae": "0.5", "simmim": "0.6"}


def knn_curve(method: str, seed: int) -> list[tuple[float, float]]:
    """Swin trials' k-NN accuracy against FLOPs, linear in log2 FLOPs: MixMAE evaluated at
    1, 2, 4, 8 TFLOPs (seed 2 stopped after 4), SimMIM at 1.5, 3, 6, 12."""
    if method == "mixmae":
        return [(1e12 * 2**k, 0.30 + 0.02 * seed + 0.1 * k) for k in range(3 if seed == 2 else 4)]
    return [(1.5e12 * 2**k, 0.25 + 0.01 * seed + 0.05 * k) for k in range(4)]


def mixmae_knn(seed: int, flops: float) -> float:
    return 0.30 + 0.02 * seed + 0.1 * math.log2(flops / 1e12)


def simmim_knn(seed: int, flops: float) -> float:
    return 0.25 + 0.01 * seed + 0.05 * math.log2(flops / 1.5e12)


def finished_run(client, experiment_id, name, tags, params=None, metrics=None, status="FINISHED"):
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in (metrics or {}).items()],
                     params=[Param(k, str(v)) for k, v in (params or {}).items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def trial(client, experiment_id, sweep_id, encoder, method, seed, accuracy, status="FINISHED"):
    """A sweep trial as the pipeline writes it, with its pretraining stage's curves where it has one."""
    curve = knn_curve(method, seed) if encoder == SWIN else []
    params = {"seed": seed, "method": method, "model": encoder, "encoder": encoder, "sweep": "methods",
              "trial": f"methods-{method}-{encoder}", "name": f"methods-{method}{seed}", "pretrain.seed": seed,
              "pretrain.method": method, "pretrain.model": encoder, "pretrain.mask_ratio": RECIPE_MASK[method]}
    metrics = {"probe_top1": accuracy, "pretrain_flops": curve[-1][0] if curve else 1e13, "knn_top1": 0.3,
               "probe.data_val_images": 480, "pretrain.eval_knn_images": 200}
    run_id = finished_run(client, experiment_id, params["name"], {KIND: "pipeline", MLFLOW_PARENT_RUN_ID: sweep_id},
                          params, metrics, status)
    stage = client.create_run(experiment_id, run_name="pretrain",
                              tags={STAGE: "pretrain", MLFLOW_PARENT_RUN_ID: run_id})
    # FLOPs are logged at step 0 too, where no k-NN accuracy is: pairing is by step, not by position
    history = [Metric("flops/train_total", 5e11, 0, 0)]
    for step, (flops, knn) in enumerate(curve, start=1):
        history += [Metric("flops/train_total", flops, 0, step), Metric("eval/knn_top1", knn, 0, step)]
    client.log_batch(stage.info.run_id, metrics=history)
    client.set_terminated(stage.info.run_id, "FINISHED")
    return run_id


def plain_run(client, experiment_id, name, method, mask_ratio, seed, knn, log_every):
    params = {"pretrain.seed": seed, "pretrain.method": method, "pretrain.model": SWIN,
              "pretrain.mask_ratio": mask_ratio, "pretrain.log_every_steps": log_every,
              "pretrain.scaling.num_workers": 1 + seed, "pretrain.data.root": "synthetic:pretrain"}
    metrics = {"pretrain.flops_train_total": 2e12, "pretrain.eval_knn_top1": knn, "pretrain.eval_knn_images": 100,
               "inat2018.val_top1": knn + 0.1, "inat2018.data_val_images": 50}
    return finished_run(client, experiment_id, name, {KIND: "pipeline"}, params, metrics)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiment ``methods``: a sweep of MixMAE and SimMIM on three encoders (3, 3 and 1
    seeds), with an unfinished trial; ``other``: a trial that must not count; ``plain``: runs
    of `mixmae run`; ``old``: a trial written before trials carried seeds and curves."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)

    def experiment(name):  # artifacts under the test's folder, not MLflow's default ./mlruns
        return client.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())

    methods = experiment("methods")
    sweep_id = finished_run(client, methods, "methods", {KIND: "sweep"})
    for (encoder, method), accuracies in PROBE.items():
        for seed, accuracy in enumerate(accuracies):
            trial(client, methods, sweep_id, encoder, method, seed, accuracy)
    trial(client, methods, sweep_id, SWIN, "mixmae", 3, 0.99, status="RUNNING")
    other = experiment("other")
    trial(client, other, finished_run(client, other, "methods", {KIND: "sweep"}), SWIN, "mixmae", 4, 0.01)
    plain = experiment("plain")
    for name, method, ratio, seed, knn, log_every in [
        ("a", "mixmae", "0.5", 0, 0.40, 10), ("b", "mixmae", "0.5", 1, 0.44, 20),
        ("c", "mixmae", "0.7", 0, 0.30, 10), ("d", "simmim", "0.6", 0, 0.35, 10),
    ]:
        plain_run(client, plain, name, method, ratio, seed, knn, log_every)
    old = experiment("old")
    old_sweep = finished_run(client, old, "old-sweep", {KIND: "sweep"})
    finished_run(client, old, "t", {KIND: "pipeline", MLFLOW_PARENT_RUN_ID: old_sweep},
                 {"method": "mixmae", "model": SWIN, "mask_ratio": 0.5}, {"probe_top1": 0.5, "pretrain_flops": 1e12})
    return uri, client


def matching(items, **wanted):
    return [i for i in items if all(getattr(i, k) == v for k, v in wanted.items())]


def test_spread_is_students_t_across_seeds():
    s = spread([0.60, 0.62, 0.64])
    half = T_975[2] * 0.02 / math.sqrt(3)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.62), pytest.approx(0.02))
    assert (s.low, s.high) == (pytest.approx(0.62 - half, abs=1e-6), pytest.approx(0.62 + half, abs=1e-6))
    two = spread([0.1, 0.3])
    assert two.high - two.mean == pytest.approx(T_975[1] * math.sqrt(0.02) / math.sqrt(2), abs=1e-6)
    one = spread([0.7])
    assert (one.mean, one.std, one.low, one.high, one.note) == (0.7, None, None, None, "one seed: no interval")


def test_verdicts_follow_the_interval_of_the_mean_difference():
    assert verdict("mixmae", "simmim", spread([0.10, 0.09, 0.11])) == "mixmae above simmim"
    assert verdict("mixmae", "simmim", spread([-0.10, -0.09, -0.11])) == "simmim above mixmae"
    assert verdict("mixmae", "simmim", spread([0.03, -0.06, 0.06])) == "within noise"
    assert verdict("mixmae", "simmim", spread([0.5])) == "one seed: no verdict"


def test_curves_are_read_linearly_in_log_flops_and_never_extrapolated():
    curve = [(1e12, 0.2), (2e12, 0.3), (4e12, 0.4)]
    assert interpolate_at(curve, 2e12 * math.sqrt(2)) == pytest.approx(0.35)  # linear in FLOPs: 0.341
    assert interpolate_at(curve, 1e12) == 0.2 and interpolate_at(curve, 4e12) == 0.4
    assert interpolate_at(curve, 4.01e12) is None and interpolate_at(curve, 0.99e12) is None
    assert interpolate_at([], 1e12) is None
    assert log_budgets(1e12, 8e12) == pytest.approx([1e12, 2e12, 4e12, 8e12])
    assert log_budgets(2e12, 1e12) == []


def test_runs_differing_only_by_seed_form_a_group(store):
    uri, client = store
    report = build_report(client, "methods")
    assert report.metric == "probe_top1"
    assert len(report.runs) == 14  # the unfinished trial and the other experiment's are not read
    assert len(report.groups) == 6
    (swin,) = matching(report.groups, encoder=SWIN, method="mixmae")
    assert sorted(r.seed for r in swin.runs) == [0, 1, 2] and list(swin.accuracy_by_seed()) == [0, 1, 2]
    half = T_975[2] * 0.02 / math.sqrt(3)
    s = swin.spread
    assert (s.n, s.mean, s.std, s.low, s.high) == (
        3, pytest.approx(0.62), pytest.approx(0.02), pytest.approx(0.62 - half), pytest.approx(0.62 + half))
    # beside it, each run's own interval over its 480 validation images (Wilson's)
    assert swin.runs[0].val_images == 480 and swin.wilson_half_width() == pytest.approx(0.0437, abs=5e-4)
    (twins,) = matching(report.groups, encoder=TWINS, method="simmim")
    assert (twins.spread.n, twins.spread.low, twins.spread.note) == (1, None, "one seed: no interval")
    assert swin.label == f"mixmae {SWIN}"


def test_methods_are_paired_by_seed_on_each_encoder(store):
    _, client = store
    comparisons = {c.first.encoder: c for c in build_report(client, "methods").comparisons}
    assert set(comparisons) == {SWIN, PVT, TWINS}
    swin, pvt, twins = comparisons[SWIN], comparisons[PVT], comparisons[TWINS]
    assert (swin.first.method, swin.second.method) == ("mixmae", "simmim")
    assert swin.differences == pytest.approx({0: 0.10, 1: 0.09, 2: 0.11})
    half = T_975[2] * 0.01 / math.sqrt(3)
    assert (swin.spread.mean, swin.spread.low, swin.spread.high) == (
        pytest.approx(0.10), pytest.approx(0.10 - half), pytest.approx(0.10 + half))
    assert swin.verdict == "mixmae above simmim"
    assert pvt.spread.mean == pytest.approx(0.01) and pvt.spread.low < 0 < pvt.spread.high
    assert pvt.verdict == "within noise"
    assert (twins.spread.n, twins.differences, twins.verdict) == (1, {0: pytest.approx(0.07)}, "one seed: no verdict")


def test_knn_accuracy_at_common_flops_budgets(store):
    _, client = store
    report = build_report(client, "methods")
    # every method reaches 1.5 to 8 TFLOPs (SimMIM starts at 1.5, MixMAE's longest runs end at 8)
    budgets = sorted({b.budget for b in report.budgets})
    ratio = (8 / 1.5) ** (1 / 3)
    assert budgets == pytest.approx([1.5e12, 1.5e12 * ratio, 1.5e12 * ratio**2, 8e12])
    assert {b.group.encoder for b in report.budgets} == {SWIN}  # the other encoders' trials have no curves
    for point in report.budgets:
        expected = mixmae_knn if point.group.method == "mixmae" else simmim_knn
        assert point.values == {seed: pytest.approx(expected(seed, point.budget)) for seed in point.values}
    mixmae = {b.budget: b for b in report.budgets if b.group.method == "mixmae"}
    # seed 2 stopped at 4 TFLOPs: no value at the two budgets above, and none made up
    assert [list(mixmae[b].values) for b in budgets] == [[0, 1, 2], [0, 1, 2], [0, 1], [0, 1]]
    assert mixmae[budgets[-1]].short == [2] and mixmae[budgets[0]].short == []
    top = mixmae[budgets[-1]].spread
    assert (top.n, top.mean) == (2, pytest.approx(0.61))
    assert top.high - top.mean == pytest.approx(T_975[1] * math.sqrt(2e-4) / math.sqrt(2), abs=1e-6)
    (simmim,) = [b.spread for b in report.budgets if b.group.method == "simmim" and b.budget == budgets[1]]
    assert (simmim.n, simmim.mean) == (3, pytest.approx(0.26 + 0.05 * math.log2(ratio)))


def test_plain_runs_group_by_the_pretrain_params_that_differ(store):
    _, client = store
    report = build_report(client, "plain")
    assert report.metric == "pretrain.eval_knn_top1"  # k-NN before a transfer stage's top-1
    labels = {g.label: g for g in report.groups}
    # workers and logging interval differ between a and b, but change nothing learned
    assert set(labels) == {
        f"mixmae {SWIN} mask_ratio=0.5", f"mixmae {SWIN} mask_ratio=0.7", f"simmim {SWIN} mask_ratio=0.6"}
    assert labels[f"mixmae {SWIN} mask_ratio=0.5"].spread.mean == pytest.approx(0.42)
    assert all(r.val_images == 100 for r in report.runs)
    # each method at its own recipe's mask ratio pairs; MixMAE at 0.7 was set apart from its recipe
    (comparison,) = report.comparisons
    assert comparison.first.label == f"mixmae {SWIN} mask_ratio=0.5"
    assert comparison.differences == {0: pytest.approx(0.05)} and comparison.verdict == "one seed: no verdict"
    chosen = build_report(client, "plain", "inat2018.val_top1")
    assert {r.val_images for r in chosen.runs} == {50} and chosen.metric == "inat2018.val_top1"


def test_an_older_trial_counts_as_seed_0_of_its_parent_sweep(store, tmp_path):
    uri, client = store
    report, files, _ = run_report(uri, "old", tmp_path)
    (run,) = report.runs
    assert run.seed == 0 and run.setting["sweep"] == "old-sweep" and run.curve == []
    assert report.budgets == [] and report.comparisons == []
    assert (tmp_path / "flops_budgets.csv").read_text().splitlines() == [",".join(TABLES["budgets"].columns)]
    assert (tmp_path / "flops_vs_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_files_hold_the_tables_and_are_logged_to_mlflow(store, tmp_path):
    uri, client = store
    report, files, run_id = run_report(uri, "methods", tmp_path)
    names = ["flops_vs_accuracy.csv", "seed_groups.csv", "paired_comparisons.csv", "flops_budgets.csv", "report.md",
             "flops_vs_accuracy.png"]
    assert [f.name for f in files] == names
    assert {a.path for a in client.list_artifacts(run_id, "report")} == {f"report/{n}" for n in names}
    assert client.get_run(run_id).data.tags[KIND] == "report"

    def rows(name):
        with (tmp_path / name).open() as f:
            return list(csv.DictReader(f))

    for name, spec in TABLES.items():
        assert list(rows(spec.file)[0]) == list(spec.columns), name
    assert len(rows("flops_vs_accuracy.csv")) == 14 and len(rows("seed_groups.csv")) == 6
    swin = next(r for r in rows("paired_comparisons.csv") if r["encoder"] == SWIN)
    assert swin["verdict"] == "mixmae above simmim" and float(swin["mean_difference"]) == pytest.approx(0.10)
    assert json.loads(swin["differences"]) == pytest.approx({"0": 0.10, "1": 0.09, "2": 0.11})
    twins = next(r for r in rows("seed_groups.csv") if r["encoder"] == TWINS)
    assert (twins["n_seeds"], twins["t95_low"], twins["note"]) == ("1", "", "one seed: no interval")
    assert len(rows("flops_budgets.csv")) == 8
    markdown = (tmp_path / "report.md").read_text()
    for spec in TABLES.values():
        assert f"## {spec.title}" in markdown and "| " + " | ".join(spec.shown) + " |" in markdown
    assert f"| mixmae {SWIN} | simmim {SWIN} | 3 | 0:+0.1000 1:+0.0900 2:+0.1100 | 0.1000 |" in markdown
    assert f"| mixmae {PVT} | simmim {PVT} | 3 |" in markdown and "| within noise |" in markdown
    assert (tmp_path / "flops_vs_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_the_report_as_json_and_nothing_else(store, tmp_path, monkeypatch):
    uri, _ = store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(app, ["report", "methods", "--tracking-uri", uri, "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert set(printed) == {
        "experiment", "metric", "runs", "groups", "comparisons", "budgets", "files", "mlflow_run_id"}
    assert (printed["experiment"], printed["metric"]) == ("methods", "probe_top1")
    assert len(printed["runs"]) == 14 and set(printed["runs"][0]) == set(TABLES["runs"].columns)
    verdicts = {c["encoder"]: c["verdict"] for c in printed["comparisons"]}
    assert verdicts == {SWIN: "mixmae above simmim", PVT: "within noise", TWINS: "one seed: no verdict"}
    twins = next(g for g in printed["groups"] if g["encoder"] == TWINS and g["method"] == "mixmae")
    assert (twins["n_seeds"], twins["mean"], twins["t95_low"]) == (1, 0.58, None)
    assert all((tmp_path / name).exists() for name in map(lambda f: f.rsplit("/", 1)[-1], printed["files"]))
    missing = CliRunner().invoke(app, ["report", "nothing-here", "--tracking-uri", uri, "--json"])
    assert missing.exit_code == 1 and missing.stdout == "" and "no MLflow experiment" in missing.stderr


def test_cli_prints_the_tables(store, tmp_path, monkeypatch):
    uri, _ = store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(app, ["report", "methods", "--tracking-uri", uri, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for spec in TABLES.values():
        assert spec.title in result.stdout
    assert "mixmae above simmim" in result.stdout and "one seed: no verdict" in result.stdout
