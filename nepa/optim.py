"""Parameter groups and learning-rate schedules."""

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

# Tokens and tables that weight decay would pull towards zero for no benefit.
_NO_DECAY_SUFFIXES = ("cls_token", "mask_token", "position_embeddings")


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Matrices decay; biases, LayerNorm / QK-norm weights, LayerScale lambdas and tokens do not."""
    return param.ndim > 1 and not name.endswith(_NO_DECAY_SUFFIXES)


def pretraining_param_groups(model: torch.nn.Module, weight_decay: float, embed_lr: float | None = None) -> list[dict]:
    """Decay / no-decay groups; with `embed_lr`, the embedding parameters get their own learning rate."""
    groups: dict[tuple[bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = uses_weight_decay(name, param)
        is_embedding = embed_lr is not None and ".embeddings." in f".{name}"
        group = groups.setdefault((decay, is_embedding), {"params": [], "weight_decay": weight_decay if decay else 0.0})
        if is_embedding:
            group["lr"] = embed_lr
        group["params"].append(param)
    return list(groups.values())


def layer_index(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for encoder layer i, num_layers + 1 for the final norm and heads."""
    if ".embeddings." in f".{name}":
        return 0
    marker = "encoder.layer."
    if marker in name:
        return int(name.split(marker, 1)[1].split(".", 1)[0]) + 1
    return num_layers + 1


def layer_decay_param_groups(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    head_lr: float | None,
    num_layers: int | None = None,
) -> list[dict]:
    """Layer-wise lr decay: encoder layer i gets lr * decay**(L-1-i), the embeddings lr * decay**L, and the
    final norm, fc_norm and classifier `head_lr` (lr when None). Each group records its `lr_factor`
    (head: 1), which the schedule uses to stretch the warm-up of the lower layers. `num_layers` (L) defaults
    to `model.config.num_hidden_layers`; a model whose encoder is a sub-model (a segmentation backbone) names it."""
    num_layers = model.config.num_hidden_layers if num_layers is None else num_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = layer_index(name, num_layers)
        decay = uses_weight_decay(name, param)
        if (index, decay) not in groups:
            is_head = index == num_layers + 1
            factor = 1.0 if is_head else layer_decay ** (num_layers - index)
            groups[(index, decay)] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": (head_lr if head_lr is not None else lr) if is_head else lr * factor,
                "lr_factor": factor,
                "layer": index,
            }
        groups[(index, decay)]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def group_warmup_steps(warmup_steps: int, lr_factor: float) -> int:
    """Lower layers (smaller factor) warm up longer: warmup - round(warmup * min(factor, 1)), at least 1."""
    return max(1, warmup_steps - round(warmup_steps * min(lr_factor, 1.0)))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr: linear warm-up, then a half-cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def layer_decay_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """The "llrd cosine warmup" schedule: each group warms up over its own number of steps, then decays."""
    schedules = []
    for group in optimizer.param_groups:
        group_warmup = group_warmup_steps(warmup_steps, group.get("lr_factor", 1.0))
        schedules.append(lambda step, w=group_warmup: warmup_cosine(step, w, total_steps))
    return LambdaLR(optimizer, schedules)
