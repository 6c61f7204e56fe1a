"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018), as DINO and
solo-learn evaluate self-supervised encoders: features pooled and L2-normalised, cosine
similarity to a labelled memory, the ``k`` most similar vote with weight
``exp(similarity / temperature)``, the class with the most weight wins."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def pooled_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The encoder's pooled features of ``images``, L2-normalised, as float32 ``(B, C)``."""
    features = encoder.forward_head(encoder.forward_features(images), pre_logits=True)
    return F.normalize(features.float(), dim=1)


@torch.no_grad()
def knn_predict(
    memory: torch.Tensor,
    memory_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``(M, num_classes)`` of ``queries`` ``(M, C)`` against ``memory`` ``(N, C)``
    (both L2-normalised) with labels ``(N,)``; fewer than ``k`` memories all vote."""
    k = min(k, memory.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ memory.T
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(top.shape[0], num_classes, dtype=top.dtype, device=top.device)
        scores.append(votes.scatter_add_(1, memory_labels[index], (top / temperature).exp()))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)
