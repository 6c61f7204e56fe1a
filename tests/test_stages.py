"""Stage settings as the driver resolves them: schedules the bill shares, masks, typed jobs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import DEFAULT_CONFIG, load_config
from pipelines.stages.jobs import StageError, StageJob
from pipelines.stages.prepare import Schedule, schedule


def test_pretraining_steps_over_pairs_and_the_schedule_is_capped_by_max_steps():
    config = load_config(DEFAULT_CONFIG)
    pretrain = config.pretrain  # batch 16 (8 pairs), 10 epochs, 1 warmup epoch
    assert schedule("pretrain", pretrain, 81) == Schedule(5, 50, 5)  # 40 pairs (one image sits out)
    capped = pretrain.model_copy(update={"max_steps": 7})
    assert schedule("pretrain", capped, 81).total_steps == 7
    inat = config.stages["inat2018"]  # batch 20, 16 epochs
    assert schedule("inat2018", inat, 100).steps_per_epoch == 5


def test_a_dataset_smaller_than_one_batch_is_refused_by_the_stage_and_by_the_bill(tmp_path):
    config = load_config(DEFAULT_CONFIG)
    with pytest.raises(StageError, match="do not fill one global batch of 8"):
        schedule("pretrain", config.pretrain, 15)
    result = CliRunner().invoke(
        app, ["plan", "--set", "pretrain.data.num_images=15", "--set", f"synthetic.root={tmp_path}", "--json"]
    )
    assert result.exit_code == 1 and "7 training samples do not fill one global batch of 8" in result.output


def test_the_pretraining_data_draws_each_methods_masks(tmp_path):
    """What the driver gives the data pipeline: the method's own mask spec (BEiT's blocks on its
    patch grid, MAE's patches, MixMAE's shared stride-32 units), at the configured ratio."""
    from pipelines.stages.prepare import StageContext, _recipes
    from pipelines.data.manifest import DataSource

    config = load_config(DEFAULT_CONFIG)
    source = DataSource(("m.parquet",), False, "imagefolder", ("a",), "label", ())
    ctx = StageContext(config, "", "", "", tmp_path)
    for method, model, layout, grid in [("mixmae", "mixmae_swin_micro_w8", "shared", (2, 2)),
                                        ("mae", "mae_vit_micro_p8", "random", (8, 8)),
                                        ("beit", "beit_micro_p8", "blocks", (8, 8))]:
        spec = load_config(DEFAULT_CONFIG, [f"pretrain.method={method}", f"pretrain.model={model}", "pretrain.monitor=null"],
                           pretrain_only=True).pretrain
        masks = _recipes(ctx, spec, source, {"train": None})["train"].arguments["masks"]
        assert (masks.layout, masks.grid, masks.ratio) == (layout, grid, spec.mask_ratio)


def test_a_job_travels_as_a_typed_object():
    config = load_config(DEFAULT_CONFIG)
    job = StageJob("coco", config.stages["coco"], "mixmae_swin_micro_w8", num_classes=3, class_names=("a", "b", "c"))
    again = pickle.loads(pickle.dumps(job))
    assert again == job and again.task == "detect" and again.spec.fpn_channels == 64


def test_the_plan_prices_the_knn_monitor(synthetic_data):
    """The quickstart evaluates twice (at 5 and 10 epochs) on the stand-in's 80 training and 24
    validation images: one encoder forward each, 2 FLOPs per multiply-add."""
    result = CliRunner().invoke(app, ["plan", "--json", "--set", f"synthetic.root={Path(synthetic_data['pretrain']).parent}",
                                      "--set", "stages={}", "--set", "stage_groups=[]"])
    assert result.exit_code == 0, result.output
    (pretrain,) = json.loads(result.stdout)
    assert pretrain["monitor_flops"] == pytest.approx(2 * (80 + 24) * 2 * pretrain["gflops"] * 1e9)
