"""The train-loop entry point; it imports nothing heavy at module level.

Ray Train's controller unpickles the train function of every run; pointing it at a
module that imports torch, timm, MLflow and the task libraries costs each stage seconds
of start-up before any worker exists. The real work is imported inside the workers.
"""

import importlib


def run_stages(config: dict) -> None:
    """Train a worker group's stages one after another. After a restart, the stages before
    the one its latest checkpoint belongs to are finished and do not run again."""
    from pipelines.stages.loop import first_to_run

    stages = config["stages"]
    for stage in stages[first_to_run([s["loop"]["stage"] for s in stages]) :]:
        importlib.import_module(f"pipelines.stages.{stage['worker']}").run_worker(stage)
