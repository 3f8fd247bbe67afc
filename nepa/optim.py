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


def is_head(name: str) -> bool:
    """The release's head group: the classifier and the encoder's final LayerNorm (not fc_norm)."""
    return name.startswith("classifier.") or name.removeprefix("vit_nepa.").startswith("layernorm.")


def layer_decay_param_groups(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    head_lr: float | None,
    num_layers: int | None = None,
    decay_last_layer: bool = False,
) -> list[dict]:
    """Layer-wise lr decay: encoder layer i gets lr * decay**(L-1-i), the embeddings lr * decay**L, the other
    parameters above the layers (fc_norm, a segmentation decoder) lr, and the classifier and final norm `head_lr`
    (lr when None). Each group records its `lr_factor` (1 above the layers), which `layer_decay_cosine_schedule`
    uses to stretch the warm-up of the lower layers, and that factor's exponent `decay_exponent`, which
    `layer_decay_ramp_schedule` raises the changing decay to. `num_layers` (L) defaults to
    `model.config.num_hidden_layers`; a model whose encoder is a sub-model (a segmentation backbone) names it.

    The release's classification recipe runs the last layer at the full lr. `decay_last_layer` gives
    mmsegmentation's convention (the MAE / BEiT segmentation recipe) instead: every exponent one higher, so layer i
    gets decay**(L-i) and the embeddings decay**(L+1); what lies above the layers keeps lr."""
    num_layers = model.config.num_hidden_layers if num_layers is None else num_layers
    top = num_layers + 1 if decay_last_layer else num_layers
    groups: dict[tuple[int, bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = layer_index(name, num_layers)
        head = is_head(name)
        decay = uses_weight_decay(name, param)
        key = (index, head, decay)
        if key not in groups:
            exponent = max(0, top - index)
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": head_lr if head and head_lr is not None else lr * layer_decay**exponent,
                "lr_factor": layer_decay**exponent,
                "decay_exponent": exponent,
                "layer": index,
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def group_warmup_steps(warmup_steps: int, lr_factor: float) -> int:
    """Lower layers (smaller factor) warm up longer: warmup - round(warmup * min(factor, 1)), at least 1."""
    return max(1, warmup_steps - round(warmup_steps * min(lr_factor, 1.0)))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """Multiplier of the peak lr: linear warm-up, then a half-cosine to `floor` (a fraction of the peak) at
    `total_steps`."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def layer_decay_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """The "llrd cosine warmup" schedule: each group warms up over its own number of steps, then decays."""
    schedules = []
    for group in optimizer.param_groups:
        group_warmup = group_warmup_steps(warmup_steps, group.get("lr_factor", 1.0))
        schedules.append(lambda step, w=group_warmup: warmup_cosine(step, w, total_steps))
    return LambdaLR(optimizer, schedules)


def layer_decay_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """The layer decay at `step` of the paper's schedule: from `start` at step 0 to `end` at `total_steps`, along a
    half-cosine."""
    return start + (end - start) * (1.0 - math.cos(math.pi * step / max(1, total_steps))) / 2.0


def layer_decay_ramp_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, layer_decay: float, layer_decay_end: float
) -> LambdaLR:
    """The "llrd cosine" schedule (the release's `get_llrd_cosine_schedule`, the paper's main-table recipe): the
    decay itself moves from `layer_decay` to `layer_decay_end` (`layer_decay_ramp`), so a group built by
    `layer_decay_param_groups` at lr * layer_decay**e runs at lr * ramp(step)**e; every group warms up over the same
    `warmup_steps`, then follows the half-cosine to 0. `layer_decay_end` equal to `layer_decay` keeps it constant;
    `layer_decay` must be above 0."""

    def schedule(step: int, exponent: int) -> float:
        ramp = layer_decay_ramp(step, total_steps, layer_decay, layer_decay_end)
        return (ramp / layer_decay) ** exponent * warmup_cosine(step, warmup_steps, total_steps)

    return LambdaLR(optimizer, [lambda step, e=group["decay_exponent"]: schedule(step, e) for group in optimizer.param_groups])
