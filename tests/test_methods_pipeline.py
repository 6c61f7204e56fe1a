"""Every method through the pipeline as a user runs it (`mixmae pretrain` of the quickstart with
another method): BEiT trains its tokenizer first, as its own stage and MLflow run, then BEiT on
its codes; a tokenizer whose codebook collapses stops with its reason; MAE drives a ViT."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import DEFAULT_CONFIG, load_config
from pipelines.pipeline import run_pipeline
from pipelines.stages.jobs import StageError
from pipelines.tracking import ENCODER, FAILED_REASON, STAGE

pytestmark = pytest.mark.usefixtures("ray_local")


def _config(tmp_path: Path, synthetic_data: dict, *overrides: str):
    return load_config(DEFAULT_CONFIG, [
        f"storage={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"synthetic.root={Path(synthetic_data['pretrain']).parent}", "tracking.system_metrics=false",
        "pretrain.reconstructions=1", *overrides,
    ], pretrain_only=True)


def _runs(tmp_path: Path) -> tuple[MlflowClient, dict]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mixmae-quickstart").experiment_id
    return client, {r.data.tags[STAGE]: r for r in client.search_runs([experiment], f"tags.`{STAGE}` != ''")}


def test_beit_trains_its_tokenizer_then_predicts_its_codes(tmp_path, synthetic_data):
    config = _config(tmp_path, synthetic_data, "pretrain.method=beit", "pretrain.model=beit_micro_p8", "pretrain.epochs=2",
                     "pretrain.tokenizer.epochs=20", "pretrain.tokenizer.eval_every_epochs=10")
    assert config.pretrain.tokenizer.view("beit_micro_p8") == 16
    assert list(config.all_stages()) == ["tokenizer", "pretrain"]
    outcome = run_pipeline(config, stages=["pretrain"])
    assert [s.name for s in outcome.stages] == ["tokenizer", "pretrain"]
    client, runs = _runs(tmp_path)
    tokenizer, pretrain = runs["tokenizer"], runs["pretrain"]
    assert tokenizer.info.status == pretrain.info.status == "FINISHED"
    recon = [m.value for m in client.get_metric_history(tokenizer.info.run_id, "train/recon_mse")]
    assert len(recon) >= 2 and recon[-1] < recon[0]
    for key in ("train/perplexity", "train/codes_used", "train/temperature", "eval/codes_used", "eval/perplexity"):
        assert key in tokenizer.data.metrics, key
    # BEiT reads the codes of the tokenizer the stage wrote, and its FLOPs count the tokenizer's training
    assert pretrain.data.tags["tokenizer"] == tokenizer.data.tags[ENCODER]
    for key in ("train/loss", "train/masked_token_acc", "flops/train_per_image"):
        assert key in pretrain.data.metrics, key
    steps, batch = 10, 16
    assert pretrain.data.metrics["flops/train_total"] == pytest.approx(
        tokenizer.data.metrics["flops/train_total"] + steps * batch * pretrain.data.metrics["flops/train_per_image"])
    assert pretrain.data.params["method"] == "beit" and "mixmae.model_uri" in pretrain.data.tags
    assert [a.path for a in client.list_artifacts(pretrain.info.run_id, "pictures")]


def test_a_tokenizer_whose_codebook_collapses_stops_with_its_reason(tmp_path, synthetic_data):
    """Two epochs of 80 stand-in images cannot use half of 512 codes: the stage stops, saying so."""
    config = _config(tmp_path, synthetic_data, "pretrain.method=beit", "pretrain.model=beit_micro_p8",
                     "pretrain.tokenizer.epochs=2", "pretrain.tokenizer.min_code_fraction=0.5")
    with pytest.raises(StageError, match=r"tokenizer's codebook collapsed: \d+ of 512 codes used .*\(at least 256 expected"):
        run_pipeline(config, stages=["pretrain"])
    _, runs = _runs(tmp_path)
    assert runs["tokenizer"].info.status == "FAILED" and "collapsed" in runs["tokenizer"].data.tags[FAILED_REASON]
    assert "pretrain" not in runs


def test_mae_pretrains_a_vit_through_the_pipeline(tmp_path, synthetic_data):
    config = _config(tmp_path, synthetic_data, "pretrain.method=mae", "pretrain.model=mae_vit_micro_p8",
                     "pretrain.max_steps=3", "pretrain.log_every_steps=1", "pretrain.scaling.num_workers=1")
    run_pipeline(config, stages=["pretrain"])
    client, runs = _runs(tmp_path)
    run = runs["pretrain"]
    assert run.info.status == "FINISHED" and (run.data.params["method"], run.data.params["encoder"]) == (
        "mae", "mae_vit_micro_p8")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert "eval/knn_top1" in run.data.metrics
