"""Stages on Ray Train. Worker side: ``loop`` (the shared training loop), one module per task
(``pretrain``, ``classify``, ``detect``, ``segment``; ``transfer`` holds what the transfer
tasks share), reached through ``entry``; settings travel as ``jobs``. Driver side:
``prepare`` (data, schedule, FLOPs, the job) and ``driver`` (MLflow runs, TorchTrainer,
progress, resume)."""
