"""The ``mixmae`` command."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipelines.cli_data import data_app
from pipelines.process_end import end_process

app = typer.Typer(no_args_is_help=True, add_completion=False, help="MixMAE pretraining and transfer on Ray + MLflow.")
app.add_typer(data_app, name="data")
# piped to a file or a CI log, rich would wrap tables at 80 columns and cut every name
console = Console(width=None if sys.stdout.isatty() else 200)


#: exit status of a run stopped by SIGTERM with its checkpoints saved (EX_TEMPFAIL: run it again)
EXIT_PREEMPTED = 75


def fail(error: Exception, code: int) -> None:
    """Print ``error`` as one unwrapped line and exit with ``code``: a message, never a traceback."""
    console.print(f"[red]{error}[/]", soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def flops(
    model: str = typer.Argument(..., help="encoder, e.g. mixmae_swin_base_w14, mixmae_pvt_v2_b2, vit_base_patch16_224, "
                                "beit_base_patch16_224"),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="input size (default: the variant's)"),
    method: Optional[str] = typer.Option(None, "--method", help="mixmae, simmim, mae or beit (default: mae for a ViT, "
                                         "beit for a BEiT, else mixmae)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Parameters and GFLOPs (multiply-adds, paper convention) of encoder + 1000-class head,
    next to timm's own model of the same name where there is one, and the training FLOPs per
    image of the method's pretraining model (BEiT's: with its tokenizer's forward, DALL-E's
    encoder at paper scale)."""
    from mixmae_core.flops import classifier_cost, flop_report, timm_counterpart
    from mixmae_core.methods import default_method

    method = method or default_method(model)
    try:
        report = flop_report(model, img_size, method=method)
    except ValueError as exc:
        fail(exc, 2)
    reference = timm_counterpart(model)
    reference_cost = classifier_cost(reference, report.img_size) if reference else None
    if as_json:
        extra = {"timm_model": reference, "timm_params_m": reference_cost and reference_cost[0],
                 "timm_gflops": reference_cost and reference_cost[1]}
        typer.echo(json.dumps({**report.as_dict(), **extra}))
        return
    table = Table(title=f"{model} @ {report.img_size}px, pretrained with {method}")
    for col in ("model", "params (M)", "GFLOPs (MACs)", "pretrain params (M)", "train GFLOP / image"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row(model, f"{report.params_m:.1f}", f"{report.gflops:.2f}", f"{report.pretrain_params_m:.1f}",
                  f"{report.train_gflops_per_image:.1f}")
    if reference_cost:
        table.add_row(f"{reference} (timm)", f"{reference_cost[0]:.1f}", f"{reference_cost[1]:.2f}", "", "")
    console.print(table)


@app.command()
def convert(
    src: Path = typer.Argument(..., exists=True, dir_okay=False,
                               help="official MixMIM checkpoint (.pth), or DALL-E's encoder.pkl"),
    dst: Path = typer.Argument(..., help="output .safetensors"),
) -> None:
    """Convert an official Sense-X/MixMIM checkpoint (a training checkpoint of main_pretrain.py or
    main_finetune.py, or its model dict) to this project's layout, or DALL-E's encoder.pkl
    (openai/DALL-E, a pickled module: read without running its code) to a BEiT tokenizer
    (`pretrain.method: beit` with its `tokenizer` option), as safetensors."""
    from mixmae_core.checkpoint import (
        CheckpointError, convert_official, is_official, load_state_dict, official_variant, save_state_dict,
    )
    import torch

    from mixmae_core.tokenizer import DalleEncoder, convert_dalle_encoder, is_dalle_pickle, save_tokenizer

    if is_dalle_pickle(src):
        try:
            state = convert_dalle_encoder(src)
        except CheckpointError as exc:
            fail(exc, 2)
        with torch.device("meta"):  # the converted weights are assigned, none drawn
            tokenizer = DalleEncoder(**DalleEncoder.config_of(state))
        tokenizer.load_state_dict(state, assign=True)
        save_tokenizer(dst, tokenizer, source=str(src))
        console.print(f"wrote {dst} (DALL-E's encoder as a BEiT tokenizer, {tokenizer.vocab_size} codes, "
                      f"{len(state)} tensors)")
        return
    try:
        state = load_state_dict(src)
        if not is_official(state):
            raise CheckpointError(
                f"{src}: expected an official MixMIM checkpoint (layers.0.downsample or decoder_pred keys), "
                f"found keys such as {sorted(state)[:4]}"
            )
        converted = convert_official(state)
    except CheckpointError as exc:
        fail(exc, 2)
    kind = "pretraining" if any(k.startswith("decoder.") for k in converted) else "classifier"
    meta = {"source": str(src), "layout": kind, "method": "mixmae"}
    variant = official_variant(converted)
    if variant:
        meta.update(model=variant[0], img_size=variant[1])
    save_state_dict(dst, converted, meta)
    console.print(f"wrote {dst} ({kind}{', ' + variant[0] if variant else ''}, {len(converted)} tensors)")


ConfigArg = typer.Argument(None, help="pipeline YAML (default: ray_configs/pipelines/quickstart.yaml)")
SetOpt = typer.Option([], "--set", help="override a config field: key.path=value (repeatable)")
VerboseOpt = typer.Option(False, "--verbose", help="show Ray's, MLflow's and the libraries' output here, not in the log file")


def _load(config: Optional[Path], overrides: list[str], pretrain_only: bool = False):
    from pipelines.config import ConfigError, load_config

    try:
        return load_config(config, overrides, pretrain_only)
    except ConfigError as exc:
        fail(exc, 2)


def _console(location: str, name: str, verbose: bool):
    """The run's console; its log file in the storage's logs folder, or, for a storage in a
    bucket (no appending there), on this machine and copied to the bucket at the end."""
    import time

    from pipelines import storage
    from pipelines.console import RunConsole

    if verbose:
        return RunConsole(None)
    file = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    root = storage.absolute(location)
    return RunConsole(storage.local_root(root) / "logs" / file,
                      copy_to=storage.join(root, "logs", file) if storage.is_remote(root) else None)


@contextmanager
def _ray_session() -> Iterator[None]:
    """Ray for one command: a session the command starts ends with it (so the workers' last
    lines reach the log file, not the console after the summary); one this process already
    runs (the caller's, as in a notebook or a test session) is left running."""
    import ray

    started_here = not ray.is_initialized()
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def _run(cfg, stages: Optional[list[str]], resume: Optional[str], verbose: bool) -> None:
    from pipelines.pipeline import run_pipeline, summary_table
    from pipelines.stages.jobs import Preempted, StageError

    run_console = _console(cfg.storage, cfg.name, verbose)
    try:
        try:
            with _ray_session():
                outcome = run_pipeline(cfg, stages=stages, resume=resume, console=run_console)
        finally:
            run_console.close()
    except Preempted as exc:
        fail(exc, EXIT_PREEMPTED)
    except StageError as exc:
        fail(exc, 1)
    console.print(summary_table(cfg, outcome))
    console.print(f"MLflow: {outcome.tracking_uri} (experiment {cfg.tracking.experiment}, run {outcome.run_id})")


@app.command()
def run(
    config: Optional[Path] = ConfigArg,
    stages: Optional[str] = typer.Option(None, "--stages", help="comma-separated subset, e.g. pretrain,inat2018"),
    resume: Optional[str] = typer.Option(None, "--resume", help="MLflow run id of a pipeline to continue"),
    overrides: list[str] = SetOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Run pretraining and the transfer stages as one MLflow experiment run."""
    cfg = _load(config, overrides)
    _run(cfg, stages.split(",") if stages else None, resume, verbose)


@app.command()
def pretrain(config: Optional[Path] = ConfigArg, overrides: list[str] = SetOpt, verbose: bool = VerboseOpt) -> None:
    """Run (or resume) only the pretraining stage of a config (and BEiT's tokenizer stage before
    it); the config's transfer stages are not checked."""
    _run(_load(config, overrides, pretrain_only=True), ["pretrain"], None, verbose)


@app.command()
def sync(config: Optional[Path] = ConfigArg, overrides: list[str] = SetOpt) -> None:
    """Deliver to MLflow what stages spooled while the tracking server was away (the next
    `mixmae run` of the config does this too). With storage in a bucket, the records wait on
    the machine that spooled them: run it there."""
    from pipelines import storage
    from pipelines.pipeline import deliver_spooled

    cfg = _load(config, overrides)
    root = storage.absolute(cfg.storage)
    left = deliver_spooled(root, cfg.tracking.delivery_wait_s, say=console.print)
    if left:
        fail(RuntimeError(f"the tracking server did not take the records in {', '.join(map(str, left))}; "
                          "nothing is lost, try again when it answers"), 1)
    console.print(f"nothing left to deliver under {storage.local_root(root)}")


@app.command()
def sweep(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="sweep YAML (ray_configs/sweeps/...)"),
    overrides: list[str] = SetOpt,
    fresh: bool = typer.Option(False, "--fresh", help="start over instead of resuming a sweep of the same name"),
    verbose: bool = VerboseOpt,
) -> None:
    """Ray Tune over pretraining settings, once per seed; each trial pretrains (its k-NN
    monitor scoring the encoder along the way), then linear-probes."""
    from pipelines.config import ConfigError
    from pipelines.stages.jobs import StageError
    from pipelines.sweep import FLOPS_METRIC, KNN_METRIC, PROBE_METRIC, load_sweep, trial_error
    from pipelines.sweep_run import run_sweep

    try:
        spec, base = load_sweep(config, overrides)
    except ConfigError as exc:
        fail(exc, 2)
    run_console = _console(base.storage, f"sweep-{spec.name}", verbose)
    run_console.start_progress()
    try:
        try:
            with _ray_session():
                sweep_run, grid = run_sweep(spec, base, resume=not fresh, console=run_console)
        finally:
            run_console.close()
    except StageError as exc:  # its storage cannot be used
        fail(exc, 1)
    table = Table(title=f"sweep {spec.name} (MLflow run {sweep_run})")
    for column in (*spec.search, "seed", "pretrain FLOPs", KNN_METRIC, PROBE_METRIC, "MLflow run", "outcome"):
        table.add_column(column)
    for result in grid:
        m = result.metrics or {}
        table.add_row(
            *(str(result.config.get(k)) for k in (*spec.search, "seed")),
            f"{m.get(FLOPS_METRIC, float('nan')):.3e}", f"{m.get(KNN_METRIC, float('nan')):.4f}",
            f"{m.get(PROBE_METRIC, float('nan')):.4f}", str(m.get("mlflow_run_id", "")),
            f"[red]failed: {trial_error(result.error)}[/]" if result.error else "ok" if PROBE_METRIC in m else "stopped",
        )
    console.print(table)
    failed = sum(1 for result in grid if result.error)
    if failed:
        fail(RuntimeError(f"{failed} of {len(grid)} trial(s) failed (recorded as FAILED in MLflow); the same "
                          "command retries them and keeps the finished ones"), 1)


@app.command(name="eval")
def evaluate(
    checkpoint: str = typer.Argument(..., help="a classifier or linear probe (.safetensors; a path or an s3:// URI)"),
    config: Optional[Path] = typer.Option(None, "--config", help="pipeline YAML whose stage names the data"),
    stage: str = typer.Option(..., "--stage", help="a classification stage: its validation split is scored"),
    overrides: list[str] = SetOpt,
) -> None:
    """Score a checkpoint on a classification stage's validation split, nothing trained: ours,
    or an official fine-tuned one converted by `mixmae convert`. Top-1/top-5 with 95% intervals,
    recorded as an MLflow run."""
    from pipelines import storage
    from pipelines.evaluate import evaluate_checkpoint
    from pipelines.stages.jobs import StageError

    cfg = _load(config, overrides)
    try:
        with _ray_session():
            scored = evaluate_checkpoint(cfg, stage, checkpoint)
    except StageError as exc:
        fail(exc, 1)
    m = scored.metrics
    table = Table(title=f"{storage.name(checkpoint)} on {stage} ({scored.images} validation images)")
    for column in ("metric", "value", "95% interval"):
        table.add_column(column)
    for key in ("val/top1", "val/top5"):
        table.add_row(key, f"{m[key]:.4f}", f"{m[key + '_ci95_low']:.4f}-{m[key + '_ci95_high']:.4f}")
    console.print(table)
    console.print(f"MLflow: {scored.tracking_uri} (run {scored.run_id})")


@app.command()
def report(
    experiment: Optional[str] = typer.Argument(None, help="MLflow experiment (default: the quickstart's)"),
    metric: Optional[str] = typer.Option(None, "--metric", help="accuracy metric of the pipeline runs"),
    out: Path = typer.Option(Path("mixmae_report"), "--out", help="where the CSV, Markdown and PNG files go"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="default: as `mixmae run` resolves it"),
    as_json: bool = typer.Option(False, "--json", help="print the tables as JSON, and nothing else, on stdout"),
) -> None:
    """Which differences are above the noise: runs grouped over seeds, methods paired by seed on
    each encoder, k-NN accuracy at common pretraining FLOPs budgets; logged back to MLflow."""
    from pipelines.config import load_config
    from pipelines.report_files import console_tables, report_json, run_report
    from pipelines.tracking import resolve_tracking_uri

    default = load_config()
    uri = resolve_tracking_uri(tracking_uri or default.tracking.uri)
    try:
        result, files, run_id = run_report(uri, experiment or default.tracking.experiment, out, metric)
    except ValueError as exc:
        if as_json:  # stdout is the script's: the message goes to stderr
            typer.echo(str(exc), err=True)
            raise typer.Exit(1)
        fail(exc, 1)
    if as_json:
        typer.echo(json.dumps(report_json(result, files, run_id)))
        return
    for table in console_tables(result):
        console.print(table)
    console.print(f"wrote {', '.join(str(f) for f in files)}; logged to MLflow run {run_id}", soft_wrap=True)


@app.command()
def plan(
    config: Optional[Path] = ConfigArg,
    overrides: list[str] = SetOpt,
    throughput: list[str] = typer.Option([], "--throughput", help="stage=images/s per device (repeatable)"),
    tflops: Optional[float] = typer.Option(None, "--tflops", help="achieved TFLOP/s per device, for the rest"),
    benchmark: Optional[Path] = typer.Option(None, "--benchmark", help="JSON from benchmarks/pretrain_throughput.py"),
    gpu_mem: Optional[float] = typer.Option(None, "--gpu-mem", help="GiB of one device: say which stages fit"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per stage: GFLOPs, optimizer steps, training FLOPs, estimated device-hours, the memory of
    one worker (with and without activation checkpointing) and the CPU cores its data needs."""
    import time

    if not as_json:
        console.print(f"pricing {config or 'the quickstart config'} (models on the meta device: shapes, no weights)")
    cfg = _load(config, overrides)
    from pipelines.worker_memory import GIB
    from pipelines.plan import MEMORY_NOTE, bill, memory_table
    from pipelines.stages.jobs import StageError

    rates = {}
    for item in throughput:
        name, _, value = item.partition("=")
        rates[name] = float(value)
    started = time.perf_counter()

    def priced(b) -> None:
        if not as_json:
            console.print(f"  {b.stage}: {b.model} @ {b.img_size}, {b.train_flops_per_image / 1e9:,.1f} GFLOP/img, "
                          f"{b.steps:,} steps, {b.memory.total() / GIB:.1f} GiB per worker "
                          f"[{time.perf_counter() - started:.1f} s]")

    try:
        bills = bill(cfg, rates, tflops, benchmark, priced)
    except StageError as exc:
        fail(exc, 1)
    if as_json:
        typer.echo(json.dumps([{**b.as_dict(), **({"gpu_mem_gib": gpu_mem, "margin_gib": b.fits(gpu_mem)} if gpu_mem
                                                  else {})} for b in bills]))
        return
    table = Table(title=f"plan for {cfg.name}")
    for column in ("stage", "model @ px", "GFLOPs", "train GFLOP/img", "steps", "images", "train PFLOP",
                   "img/s/device", "device-h", "wall-h"):
        table.add_column(column, justify="left" if column in ("stage", "model @ px") else "right")

    def hours(value):
        return "n/a" if value is None else f"{value:,.1f}"

    for b in bills:
        table.add_row(
            b.stage, f"{b.model} @ {b.img_size}", f"{b.gflops:.1f}", f"{b.train_flops_per_image / 1e9:.1f}",
            f"{b.steps:,}", f"{b.images:,}", f"{b.train_flops / 1e15:,.1f}",
            "n/a" if b.throughput is None else f"{b.throughput:,.0f}", hours(b.device_hours), hours(b.wall_hours),
        )
    console.print(table)
    console.print("throughput: " + "; ".join(f"{b.stage}: {b.throughput_source}" for b in bills))
    for b in (b for b in bills if b.monitor_flops is not None):
        console.print(f"{b.stage}: its k-NN monitor costs {b.monitor_flops / 1e15:,.3f} PFLOP, "
                      f"{b.monitor_flops / b.train_flops:.1%} of its training FLOPs")
    console.print(memory_table(f"memory per worker of {cfg.name} (GiB)", bills, gpu_mem))
    console.print(MEMORY_NOTE)
    for b in bills:
        if b.cores_per_device is not None:
            console.print(
                f"{b.stage}: {b.cores_per_device:.1f} CPU cores per device for {b.throughput:,.0f} img/s "
                f"({b.decode_per_core:.0f} img/s per decoding core, the {b.decode_size}-px pretraining decode figure), "
                f"cpus_per_worker {b.cpus_per_worker:g}"
            )
        warning = b.cpu_warning()
        if warning:
            console.print(f"[yellow]warning: {warning}[/]", soft_wrap=True)


def main() -> NoReturn:
    """The ``mixmae`` command. It ends with typer's status (1 after an uncaught error, printed
    as Python would) through :func:`pipelines.process_end.end_process`."""
    try:
        app()
        status = 0
    except SystemExit as exc:
        status = 0 if exc.code is None else exc.code
        if not isinstance(status, int):  # a message, which Python prints and exits 1 for
            print(status, file=sys.stderr)
            status = 1
    except BaseException as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
        status = 130 if isinstance(exc, KeyboardInterrupt) else 1
    end_process(status)
