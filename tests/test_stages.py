"""Stage settings as the driver resolves them: schedules the bill shares, masks, typed jobs."""

from __future__ import annotations

import pickle

import pytest
import torch
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


@pytest.mark.parametrize("mode", ["pair", "batch"])
def test_mask_mode_batch_gives_every_pair_of_a_micro_batch_one_mask(mode):
    from pipelines.stages.pretrain import PretrainTask

    config = load_config(DEFAULT_CONFIG, [f"pretrain.mask_mode={mode}"])
    task = PretrainTask(StageJob("pretrain", config.pretrain, config.pretrain.model))
    drawn = torch.rand(4, 2, 2) < 0.5
    drawn[1] = ~drawn[0]
    masks = task.masks(drawn)
    if mode == "pair":
        assert torch.equal(masks, drawn)
    else:
        assert masks.shape == drawn.shape and all(torch.equal(m, drawn[0]) for m in masks)


def test_a_job_travels_as_a_typed_object():
    config = load_config(DEFAULT_CONFIG)
    job = StageJob("coco", config.stages["coco"], "mixmae_swin_micro_w8", num_classes=3, class_names=("a", "b", "c"))
    again = pickle.loads(pickle.dumps(job))
    assert again == job and again.task == "detect" and again.spec.fpn_channels == 64
