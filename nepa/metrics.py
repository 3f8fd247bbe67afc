"""Metrics: top-k accuracy and the collapse signal (the frozen-encoder protocols are in `nepa.probes`)."""

import numpy as np
import torch
import torch.nn.functional as F


def top5_indices(logits: torch.Tensor) -> torch.Tensor:
    """The 5 best classes (all of them when there are fewer) along the last axis of `logits`."""
    return logits.topk(min(5, logits.shape[-1]), dim=-1).indices


def top5_and_nll(logits: torch.Tensor | tuple, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`preprocess_logits_for_metrics`: each image's 5 best classes and negative log-likelihood (per head, for a
    probe grid's (images, heads, classes) logits), not the logits. The loss is then averaged over images, each
    counted once: the Trainer's own eval_loss repeats each process's batch mean, which weighs in the images that
    accelerate repeats to even the processes' last batches."""
    if isinstance(logits, tuple):
        logits = logits[0]
    targets = labels if logits.ndim == 2 else labels[:, None].expand(-1, logits.shape[1])
    return top5_indices(logits), F.cross_entropy(logits.float().movedim(-1, 1), targets, reduction="none")


def top1_top5_hits(top5, labels):
    """Whether each label is the first of its `top5` classes, and whether it is among them: numpy arrays or torch
    tensors, `labels` shaped as `top5` without its last axis."""
    hits = top5 == labels[..., None]
    return hits[..., 0], hits.any(-1)


def accuracy_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` over `top5_and_nll`'s predictions: top-1 `accuracy`, `top5` and the mean per-image `loss`
    (which replaces the Trainer's eval_loss)."""
    top5, nll = eval_prediction.predictions
    top1, top5 = top1_top5_hits(np.asarray(top5), np.asarray(eval_prediction.label_ids).reshape(-1))
    return {"accuracy": float(top1.mean()), "top5": float(top5.mean()), "loss": float(np.mean(nll))}


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
