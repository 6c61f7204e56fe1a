"""The train-loop entry point and the callbacks of Ray Train's controller; it imports nothing
heavy at module level.

Ray Train's controller unpickles the train function and the callbacks of every run; pointing
it at a module that imports torch, timm, MLflow and the task libraries costs each stage seconds
of start-up before any worker exists. The real work is imported inside the workers.
"""

import importlib
import pickle
from dataclasses import replace

from ray import cloudpickle
from ray.train import UserCallback


def train_loop_config(jobs: list) -> dict:
    """The train-loop config of a run of ``jobs`` (:func:`run_stages`, :func:`score_checkpoint`).
    The jobs travel pickled: the controller unpickles every config it is given, and a
    pretraining job's data recipe holds the method's ``MaskSpec``, whose package imports torch,
    timm and torchvision (seconds before any worker of the run exists). Only the workers
    unpickle them."""
    return {"jobs": cloudpickle.dumps(jobs)}


def unpack_jobs(config: dict) -> list:
    """The jobs :func:`train_loop_config` packed (in a worker)."""
    return pickle.loads(config["jobs"])


def run_stages(config: dict) -> None:
    """Train a worker group's jobs (:func:`train_loop_config`) one after another. After a
    restart, the jobs before the one its latest checkpoint belongs to are finished and do not
    run again. Each job's task class is ``TASK`` of the module named after its task.

    A job that starts from the encoder an earlier job of the group exports (``weights_from``:
    a sweep trial's probe after its pretraining) reads it from that job's final checkpoint, in
    the run's storage, once every worker is past that job; if there is none (the earlier job
    stopped or failed), the job does not run, and the driver says why."""
    import ray.train

    from pipelines import storage
    from pipelines.stages.checkpoints import final_encoder
    from pipelines.stages.distributed import all_gather
    from pipelines.stages.loop import train
    from pipelines.stages.state import Resume

    jobs = unpack_jobs(config)
    resume = Resume()
    for job in jobs[resume.first_to_run([j.name for j in jobs]) :]:
        if job.weights_from:
            all_gather(None)  # rank 0 returns from a stage once its final checkpoint is persisted
            trainer = storage.join(job.loop.storage, ray.train.get_context().get_experiment_name())
            weights = final_encoder(trainer, job.weights_from)
            if weights is None:
                continue
            job = replace(job, encoder_weights=weights)
        train(importlib.import_module(f"pipelines.stages.{job.task}").TASK(job), resume)


class StageReports(UserCallback):
    """A stage's Ray Train callback, shown only that stage's reports (every report names its
    stage): a worker group may train several stages, and a sweep's scheduler must see the
    pretraining's evaluations, never the probe's loss."""

    def __init__(self, stage: str, callback: UserCallback):
        self.stage, self.callback = stage, callback

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if metrics and metrics[0].get("stage") == self.stage:
            self.callback.after_report(run_context, metrics, checkpoint)

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.callback.after_exception(run_context, worker_exceptions)


def score_checkpoint(config: dict) -> None:
    """``mixmae eval``'s workers: each scores its slice of the validation split; rank 0 records
    the metrics on the evaluation's MLflow run."""
    import ray.train
    import ray.train.torch

    from pipelines.stages.classify import ScoreTask
    from pipelines.tracking import RunLogger

    (job,) = unpack_jobs(config)
    task = ScoreTask(job)
    metrics = task.evaluate(task.build(ray.train.torch.get_device()))
    if ray.train.get_context().get_world_rank() == 0:
        RunLogger(job.loop.tracking_uri, job.loop.run_id).metrics(metrics, 0)
