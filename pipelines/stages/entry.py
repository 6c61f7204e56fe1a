"""Train-loop entry points that import nothing heavy at module level.

Ray Train's controller unpickles the train function of every run; pointing it at a
module that imports torch, timm, MLflow and the task libraries costs each stage seconds
of start-up before any worker exists. The real work is imported inside the workers.
"""


def pretrain_worker(config: dict) -> None:
    from pipelines.stages.pretrain import run_worker

    run_worker(config)


def transfer_worker(config: dict) -> None:
    from pipelines.stages.transfer import run_worker

    run_worker(config)
