"""The train-loop entry point; it imports nothing heavy at module level.

Ray Train's controller unpickles the train function of every run; pointing it at a
module that imports torch, timm, MLflow and the task libraries costs each stage seconds
of start-up before any worker exists. The real work is imported inside the workers.
"""

import importlib
import pickle

from ray import cloudpickle


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
    run again. Each job's task class is ``TASK`` of the module named after its task."""
    from pipelines.stages.loop import train
    from pipelines.stages.state import Resume

    jobs = unpack_jobs(config)
    resume = Resume()
    for job in jobs[resume.first_to_run([j.name for j in jobs]) :]:
        train(importlib.import_module(f"pipelines.stages.{job.task}").TASK(job), resume)


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
