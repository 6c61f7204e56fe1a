"""Orchestration of MixMAE pretraining and transfer stages on Ray, recorded in MLflow."""
