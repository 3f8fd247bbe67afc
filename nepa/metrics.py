"""Metrics: top-k accuracy and the collapse signal (the frozen-encoder protocols are in `nepa.probes`)."""

import numpy as np
import torch
import torch.nn.functional as F


def top5_indices(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the 5 best classes, not (samples x classes) logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.topk(min(5, logits.shape[-1]), dim=-1).indices


def top1_top5_hits(top5, labels):
    """Whether each label is the first of its `top5` classes, and whether it is among them: numpy arrays or torch
    tensors, `labels` shaped as `top5` without its last axis."""
    hits = top5 == labels[..., None]
    return hits[..., 0], hits.any(-1)


def accuracy_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` over the top-5 indices: top-1 `accuracy` and `top5`."""
    top1, top5 = top1_top5_hits(np.asarray(eval_prediction.predictions), np.asarray(eval_prediction.label_ids).reshape(-1))
    return {"accuracy": float(top1.mean()), "top5": float(top5.mean())}


@torch.no_grad()
def mean_pairwise_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine between distinct tokens of the same image, averaged over the batch.

    Near 1 means the embeddings collapsed to one direction (the failure stop-gradient prevents).
    O(batch * tokens * dim): |sum of unit vectors|^2 = tokens + sum over ordered pairs of cosines."""
    unit = F.normalize(embeddings.float(), dim=-1)
    tokens = unit.shape[1]
    pair_sum = unit.sum(dim=1).pow(2).sum(dim=-1) - tokens
    return (pair_sum / (tokens * (tokens - 1))).mean()


def rankme(singular_values: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., 2023), the effective rank of an embedding matrix from its singular values: exp of the
    entropy of the values normalised to sum 1. From 1 (every embedding on one line: collapse) to the matrix's width."""
    p = singular_values.double() / singular_values.double().sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))
