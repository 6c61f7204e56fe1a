"""Transfer stages sharing one Ray Train worker group (``stage_groups``): one trainer for the
group, a stage that stops does not stop the next, a killed worker resumes the stage it was in."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import ConfigError, PipelineConfig, load_config
from pipelines.data.order import task_resources, units_per_task
from pipelines.pipeline import groups_beside, run_pipeline
from pipelines.stages import driver
from pipelines.stages.jobs import MIN_DATA_CPUS, Preempted, StageError, data_cpus
from pipelines.stages.loop import PREEMPTED
from pipelines.stages.prepare import PENDING_ENCODER
from pipelines.tracking import COMPLETE, ENCODER, FAILED_REASON
from tests.servers import WorkerKiller

GROUP = ["places205", "inat2018"]


def make_config(tmp_path: Path, synthetic_data: dict, **first_stage) -> PipelineConfig:
    def classify(root: str, **overrides) -> dict:
        return {
            "task": "classify", "init": "random", "img_size": 64, "data": {"layout": root.split(":")[0], "root": f"synthetic:{root.split(':')[1]}"},
            "epochs": 4, "batch_size": 20, "base_lr": 1e-2, "warmup_epochs": 0, "layer_decay": None, "drop_path": 0.0,
            "auto_augment": None, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0, "reprob": 0.0, "crop_pct": 1.0,
            "log_every_steps": 1, "checkpoint_every_steps": 5, "eval_every_epochs": 4,
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 1}, **overrides,
        }

    return PipelineConfig.model_validate(
        {
            "name": "group",
            "storage": str(tmp_path / "runs"),
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "groups"},
            "synthetic": {"root": str(Path(synthetic_data["pretrain"]).parent)},
            "pretrain": {"model": "mixmae_swin_micro_w8", "img_size": 64, "epochs": 1,
                         "data": {"layout": "imagefolder", "root": "synthetic:pretrain"}},
            "stage_groups": [GROUP],
            # config order differs from the group's: the group runs in its own order
            "stages": {"inat2018": classify("inat:inat2018"), "places205": classify("places:places205", **first_stage)},
        }
    )


def _runs(client: MlflowClient) -> dict:
    experiment = client.get_experiment_by_name("groups").experiment_id
    return {run.data.tags["mixmae.stage"]: run for run in client.search_runs([experiment], "tags.`mixmae.kind` = 'stage'")}


def _losses(client: MlflowClient, run_id: str) -> list:
    return client.get_metric_history(run_id, "train/loss")


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in _losses(client, run_id)]


def _latest_registered_stage(storage: Path) -> str | None:
    """The stage of the checkpoint Ray Train's controller registered last (what a restart resumes from)."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        if latest and (snapshot.parent / latest / "meta.json").is_file():
            return json.loads((snapshot.parent / latest / "meta.json").read_text())["stage"]
    return None


@pytest.mark.usefixtures("ray_local")
def test_a_group_goes_on_past_a_diverged_stage_and_a_killed_worker_resumes_its_current_stage(tmp_path, synthetic_data):
    """One Ray Train run for the group: its first stage diverges and stops (the next one goes
    on), a worker of the second is killed after its first checkpoint, and the restarted group
    resumes the second stage from that checkpoint without running the first again."""
    config = make_config(tmp_path, synthetic_data, base_lr=1e9, checkpoint_every_steps=100)
    client = MlflowClient(config.tracking.uri)
    with WorkerKiller(lambda: _latest_registered_stage(tmp_path / "runs") == "inat2018") as killer:
        with pytest.raises(StageError, match=r"places205: loss became non-finite at step \d+; .*Last good checkpoint: none"):
            run_pipeline(config, stages=GROUP)
    assert killer.killed, "the test never got to kill the worker"
    runs = _runs(client)
    first, second = runs["places205"], runs["inat2018"]
    assert first.info.status == "FAILED"
    failed_at = int(re.search(r"non-finite at step (\d+)", first.data.tags[FAILED_REASON]).group(1))
    assert _steps(client, first.info.run_id) == list(range(1, failed_at))  # stopped there, and not run again
    # the group runs in its own order, not the config's
    assert _losses(client, first.info.run_id)[0].timestamp < _losses(client, second.info.run_id)[0].timestamp
    # the second (100 images, 5 steps an epoch) resumed from one of its checkpoints (every 5 steps)
    assert second.data.tags["mixmae.resumed_from"] in {"step 5", "step 10", "step 15"}
    assert _steps(client, second.info.run_id) == list(range(1, 21))  # continuous: no gap, no step twice
    assert second.info.status == "FINISHED" and second.data.tags[COMPLETE] == "true"
    assert Path(second.data.tags[ENCODER]).is_file() and "val/top1" in second.data.metrics
    assert "checkpoint/model.safetensors" in {a.path for a in client.list_artifacts(second.info.run_id, "checkpoint")}
    trainers = [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(first.data.tags["mlflow.parentRunId"])]
    assert trainers == [f"{first.data.tags['mlflow.parentRunId']}-places205+inat2018"], trainers


def test_stage_groups_are_validated_and_ordered_as_written(tmp_path):
    config = load_config(overrides=["stage_groups=[[coco,inat2018],[places365,ade20k]]"])
    assert config.worker_groups(list(config.stages)) == [
        ("coco+inat2018", ["coco", "inat2018"]),
        ("inat2019", ["inat2019"]),
        ("places205", ["places205"]),
        ("places365+ade20k", ["places365", "ade20k"]),
    ]
    assert config.worker_groups(["ade20k"]) == [("places365+ade20k", ["ade20k"])]
    assert config.group_name("ade20k") == "places365+ade20k" and config.group_name("pretrain") == "pretrain"
    for groups, message in [
        ("[[coco,nope]]", r"\['nope'\] are not transfer stages"),
        ("[[coco,pretrain]]", r"\['pretrain'\] are not transfer stages of this config \(pretrain may open a group\)"),
        ("[[pretrain,coco]]", "scaling must be the same"),
        ("[[coco],[coco,inat2018]]", "in one group only"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[f"stage_groups={groups}"])
    with pytest.raises(ConfigError, match="scaling must be the same"):
        load_config(overrides=["stage_groups=[[coco,inat2018]]", "stages.coco.scaling.num_workers=2"])


def test_pretraining_may_open_a_group_whose_stages_run_after_it():
    """`pretrain` first in a group: its transfer stages train in the pretraining's worker group
    (first of all groups); without the pretraining selected they run in a group of that name,
    the trainer their checkpoints are in."""
    config = load_config(overrides=["stage_groups=[[pretrain,inat2018],[places365,ade20k]]",
                                    "stages.inat2018.scaling.num_workers=2"])
    assert config.worker_groups(["pretrain", *config.stages]) == [
        ("pretrain+inat2018", ["pretrain", "inat2018"]),
        ("inat2019", ["inat2019"]), ("places205", ["places205"]), ("places365+ade20k", ["places365", "ade20k"]),
        ("coco", ["coco"]),
    ]
    assert config.worker_groups(["inat2018"]) == [("pretrain+inat2018", ["inat2018"])]
    assert config.group_name("pretrain") == config.group_name("inat2018") == "pretrain+inat2018"


def test_groups_side_by_side_share_the_cpus_their_workers_leave_to_decode():
    """The quickstart's two groups (one worker of 0.5 CPU each, 4 CPUs, two at once) each decode
    with half of the 3 CPUs their workers leave, not with 3.5 each (the other group's tasks
    would queue behind theirs for a whole epoch); a sweep trial's two pretraining workers beside
    another trial's get a share of one CPU, and tasks that ask for that share."""
    config = load_config()
    groups = config.worker_groups(list(config.stages))
    assert [names for _, names in groups] == [["coco", "inat2018"], ["ade20k", "places205", "places365", "inat2019"]]
    assert groups_beside(config, groups, parallel=2) == [[0.5], [0.5]]
    assert groups_beside(config, groups, parallel=1) == [[], []]
    mixed = load_config(overrides=["stage_groups=[]", "stages.coco.scaling.num_workers=2"])
    alone = mixed.worker_groups(list(mixed.stages))
    beside = dict(zip((group for group, _ in alone), groups_beside(mixed, alone, parallel=3)))
    assert beside["coco"] == [0.5, 0.5] and beside["inat2018"] == [1.0, 0.5]  # the largest two of the others
    classify = config.stages["inat2018"].scaling
    assert data_cpus(4, classify, [0.5]) == 1.5 and data_cpus(4, classify) == 3.5
    pretrain = config.pretrain.scaling  # 2 workers of 0.5
    assert data_cpus(4, pretrain, [1.1]) == pytest.approx(0.475)
    assert data_cpus(2, pretrain, [1.0, 1.0]) == MIN_DATA_CPUS
    assert task_resources(0.475) == {"num_cpus": 0.475} and task_resources(1.5) == {}
    assert units_per_task(300, 2, cpus=0.475, max_units=256) == units_per_task(300, 2, cpus=1, max_units=256) == 150


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("outcome", ["diverged", "stopped"])
def test_a_stage_after_the_pretraining_in_its_group_does_not_run_without_its_encoder(tmp_path, synthetic_data, monkeypatch, outcome):
    """The driver's account of a group the pretraining opens (the workers' part: the sweep tests
    and the cluster job), given what the workers leave when the pretraining diverges (its
    reason) or is stopped by SIGTERM (where it stopped), and no encoder: the next stage did not
    run and says why, or waits, KILLED like the pretraining, for the same command again."""
    raw = make_config(tmp_path, synthetic_data).model_dump(mode="json")
    raw["pretrain"].update(scaling=raw["stages"]["inat2018"]["scaling"], batch_size=16)
    raw["stages"]["inat2018"]["init"] = "pretrained"
    raw.update(stage_groups=[["pretrain", "inat2018"]], stages={"inat2018": raw["stages"]["inat2018"]})
    config = PipelineConfig.model_validate(raw)
    client = MlflowClient(config.tracking.uri)

    def fit(ctx, group, stages):
        assert group == "pretrain+inat2018" and [s.job.name for s in stages] == ["pretrain", "inat2018"]
        assert (stages[1].job.weights_from, stages[1].job.encoder_weights) == ("pretrain", None)
        tag = {"diverged": FAILED_REASON, "stopped": PREEMPTED}[outcome]
        client.set_tag(stages[0].job.loop.run_id, tag, {"diverged": "pretrain: loss became non-finite at step 3",
                                                        "stopped": "step 2"}[outcome])

    monkeypatch.setattr(driver, "_fit", fit)
    if outcome == "diverged":
        with pytest.raises(StageError, match="non-finite at step 3; stage inat2018 did not run: it starts from the encoder "
                                             "stage pretrain exports, and pretrain did not finish"):
            run_pipeline(config)
    else:
        with pytest.raises(Preempted, match="pretrain saved a checkpoint at step 2; run the same command again"):
            run_pipeline(config)
    runs = _runs(client)
    assert runs["inat2018"].data.tags["init"] == PENDING_ENCODER
    status = {"diverged": "FAILED", "stopped": "KILLED"}[outcome]
    assert runs["pretrain"].info.status == runs["inat2018"].info.status == status
    if outcome == "diverged":
        assert runs["inat2018"].data.tags[FAILED_REASON].startswith("stage inat2018 did not run")
