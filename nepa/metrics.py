"""Metrics: top-k accuracy, the collapse signal, and the frozen-feature k-NN and linear probes."""

import numpy as np
import torch
import torch.nn.functional as F


def top5_indices(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the 5 best classes, not (samples x classes) logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.topk(min(5, logits.shape[-1]), dim=-1).indices


def accuracy_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` over the top-5 indices: top-1 `accuracy` and `top5`."""
    top5, labels = eval_prediction.predictions, eval_prediction.label_ids
    labels = np.asarray(labels).reshape(-1, 1)
    top5 = np.asarray(top5)
    return {
        "accuracy": float((top5[:, :1] == labels).mean()),
        "top5": float((top5 == labels).any(axis=1).mean()),
    }


@torch.no_grad()
def mean_pairwise_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine between distinct tokens of the same image, averaged over the batch.

    Near 1 means the embeddings collapsed to one direction (the failure stop-gradient prevents).
    O(batch * tokens * dim): |sum of unit vectors|^2 = tokens + sum over ordered pairs of cosines."""
    unit = F.normalize(embeddings.float(), dim=-1)
    tokens = unit.shape[1]
    pair_sum = unit.sum(dim=1).pow(2).sum(dim=-1) - tokens
    return (pair_sum / (tokens * (tokens - 1))).mean()


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN on cosine similarity: each of the k neighbours votes exp(sim / T) for its class.
    Returns class scores (queries, num_classes)."""
    train_features = F.normalize(train_features.float(), dim=-1)
    k = min(k, train_features.shape[0])
    scores = []
    for chunk in F.normalize(query_features.float(), dim=-1).split(chunk_size):
        similarity, neighbours = (chunk @ train_features.T).topk(k, dim=-1)
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def linear_probe_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    min_steps: int = 1000,
) -> torch.Tensor:
    """A linear classifier on standardised frozen features (AdamW, cosine lr). Returns logits of the queries.

    Trains for `epochs`, but at least `min_steps` optimiser steps, so that a small feature bank (one
    batch per epoch) is not left underfitted. `seed` fixes the initial weights and the batch order."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    x_train = ((train_features - mean) / std).float()
    x_query = ((query_features - mean) / std).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = torch.nn.Linear(x_train.shape[1], num_classes)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-x_train.shape[0] // batch_size))
    epochs = max(epochs, -(-min_steps // steps_per_epoch))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=generator)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(classifier(x_train[batch]), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return classifier(x_query)


def scores_to_metrics(scores: torch.Tensor, labels: torch.Tensor, prefix: str = "eval") -> dict[str, float]:
    """Top-1 / top-5 and cross-entropy of class scores (logits, or log-normalised k-NN votes)."""
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return {
        f"{prefix}_accuracy": float((top5[:, 0] == labels).float().mean()),
        f"{prefix}_top5": float((top5 == labels[:, None]).any(dim=1).float().mean()),
        f"{prefix}_loss": float(F.cross_entropy(scores, labels)),
    }
