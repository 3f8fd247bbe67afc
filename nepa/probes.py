"""Frozen-encoder evaluation: k-NN over a feature bank sharded across processes, and grids of linear or attentive
probes trained together under the Trainer, one forward of the frozen encoder per batch for all of them.

- k-NN (DINO's protocol): each process encodes its shard of the train split (every world_size-th image) and keeps
  the L2-normalised mean patch tokens on its device (fp16 on a GPU); every query is scored against every shard and
  each shard's top-k are merged, so no process holds the whole split.
- Linear probe (DINOv2's protocol): a grid of learning rates x features (mean patch token, CLS token, the
  concatenated mean tokens of the last 4 blocks), one linear head each, trained on augmented images; each head
  standardises its feature first with a non-affine BatchNorm (MAE's linear probe).
- Attentive probe (AIM's): the average of chosen blocks' patch tokens, a non-affine BatchNorm over the tokens, one
  learned query attending over them with key and value projections, a linear classifier; a grid of learning rates.

The heads are independent: the loss is the sum of their cross-entropies, so each head's gradient is that of its
own loss, each has its own learning rate, weight decay and gradient clipping, and the best head is reported.
"""

import contextlib
import logging
import math
import random
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from models.vit_nepa import ViTNepaModel

from .checkpoint import load_model
from .data import collate_images, get_split, has_class_labels, image_dataset, num_classes
from .metrics import rankme, top1_top5_hits, top5_and_nll, top5_indices
from .optim import warmup_cosine
from .trainer import NepaTrainer

logger = logging.getLogger(__name__)

KNN_K, KNN_TEMPERATURE = 20, 0.07  # DINO's k-NN
LINEAR_FEATURES = ("mean", "cls", "last4")
# AdamW (the Trainer's default optimiser) on standardised features: the miniature's best heads were at 0.03 to 0.1
# (docs/miniature.md); 8 values over two decades around them.
LINEAR_LRS = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2)
ATTENTIVE_BLOCKS = (6,)  # AIM's: the last 6 blocks' tokens, averaged
ATTENTIVE_LRS = (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3)  # AIMv2, Table A2 (arXiv 2411.14402)


def load_frozen_encoder(path: str, is_causal: bool) -> ViTNepaModel:
    """The encoder of any saved ViT-NEPA folder (pretraining or classifier), frozen, with causal or bidirectional
    attention whatever its config says (`is_causal` is read when the attention layers are built)."""
    model = load_model(ViTNepaModel, path, "--model_name_or_path", "encoder", "pass a ViT-NEPA model folder.", is_causal=is_causal)
    return model.requires_grad_(False).eval()


def pooled_features(encoder: ViTNepaModel, pixel_values: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """`mean`: the mean patch token; `cls`: the CLS token (under causal attention it sees only itself, so it is the
    same for every image); `last4`: the last 4 blocks' mean patch tokens, each through the final LayerNorm, end to end."""
    outputs = encoder(pixel_values, output_hidden_states="last4" in names)
    last = outputs.last_hidden_state
    features = {"mean": last[:, 1:].mean(dim=1), "cls": last[:, 0]}
    if "last4" in names:
        blocks = outputs.hidden_states[-4:]
        features["last4"] = torch.cat([encoder.layernorm(block[:, 1:]).mean(dim=1) for block in blocks], dim=-1)
    return {name: features[name] for name in names}


def block_range(blocks: list[int], depth: int) -> tuple[int, int]:
    """`[K]`: the last K blocks; `[FIRST, LAST]`: blocks FIRST..LAST (1-based, inclusive). Returns (first, last)."""
    if len(blocks) == 1:
        first, last = depth - blocks[0] + 1, depth
    elif len(blocks) == 2:
        first, last = blocks
    else:
        raise ValueError(f"--attentive_blocks takes K (the last K blocks) or FIRST LAST; got {blocks}.")
    if not 1 <= first <= last <= depth:
        raise ValueError(
            f"--attentive_blocks {' '.join(map(str, blocks))} asks for blocks {first}..{last}, but the encoder has "
            f"blocks 1..{depth}: pass a K of at most {depth}, or FIRST LAST within 1..{depth}."
        )
    return first, last


def block_tokens(encoder: ViTNepaModel, pixel_values: torch.Tensor, blocks: tuple[int, int]) -> torch.Tensor:
    """The patch tokens (batch, patches, hidden) averaged over blocks FIRST..LAST (1-based)."""
    hidden_states = encoder(pixel_values, output_hidden_states=True).hidden_states  # [0] is the embeddings
    return torch.stack(hidden_states[blocks[0] : blocks[1] + 1]).mean(dim=0)[:, 1:]


# --- k-NN ---------------------------------------------------------------------------------------------------------


def shard_indices(size: int, process_index: int, world_size: int) -> range:
    """This process's images of a split: every world_size-th, from its rank (sizes differ by at most one)."""
    return range(process_index, size, world_size)


@torch.no_grad()
def encode_shard(trainer: NepaTrainer, dataset, description: str) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised mean patch tokens and labels (-1 without labels) of this process's shard of `dataset`, on its
    device: fp16 on an accelerator (half the memory; cosine similarities need no more), float32 on the CPU (fast
    matmuls). The model is `trainer.model` as it is: the caller puts it in eval mode."""
    args = trainer.args
    indices = shard_indices(len(dataset), args.process_index, args.world_size)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=args.per_device_eval_batch_size,
        collate_fn=collate_images,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory and args.device.type == "cuda",
        persistent_workers=False,
    )
    dtype = torch.float32 if args.device.type == "cpu" else torch.float16
    features = torch.empty(len(indices), trainer.model.config.hidden_size, dtype=dtype, device=args.device)
    labels = torch.full((len(indices),), -1, dtype=torch.long, device=args.device)  # -1: an unlabelled dataset
    start = 0
    progress = tqdm(loader, desc=description, disable=args.disable_tqdm or not trainer.is_local_process_zero())
    for batch in progress:
        batch = {name: value.to(args.device, non_blocking=True) for name, value in batch.items()}
        hidden = trainer.forward_without_grad(trainer.model, batch).last_hidden_state
        end = start + len(hidden)
        features[start:end] = F.normalize(hidden[:, 1:].float().mean(dim=1), dim=-1).to(dtype)
        if "labels" in batch:
            labels[start:end] = batch["labels"]
        start = end
    return features, labels


class KnnBank:
    """This process's shard of the train split's features, and the weighted k-NN vote of DINO: each of a query's k
    nearest train images (cosine similarity s) votes exp(s / T) for its class."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.features, self.labels, self.num_classes = features, labels, num_classes

    @classmethod
    def build(cls, trainer: NepaTrainer, dataset, num_classes: int) -> "KnnBank":
        return cls(*encode_shard(trainer, dataset, "k-NN train features"), num_classes)

    def local_neighbours(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities and labels of each query's k nearest images in this shard, padded with -inf (no vote)
        when the shard holds fewer than k."""
        similarity = queries.to(self.features.dtype) @ self.features.T
        found = min(k, similarity.shape[1])
        values, positions = similarity.topk(found, dim=1)  # in the bank's dtype: no float copy of all similarities
        values = values.float()
        labels = self.labels[positions]
        if found < k:
            values = F.pad(values, (0, k - found), value=-math.inf)
            labels = F.pad(labels, (0, k - found))
        return values, labels

    @torch.no_grad()
    def evaluate(self, trainer: NepaTrainer, queries: torch.Tensor, query_labels: torch.Tensor, ks, temperature: float) -> dict:
        """Score every process's queries (this process holds its shard of them) against every shard: the queries
        are gathered in chunks, each process finds their k nearest in its shard, and the gathered per-shard
        neighbours are merged. Every process ends with the metrics of all queries."""
        accelerator, args = trainer.accelerator, trainer.args
        largest_k, chunk = max(ks), args.per_device_eval_batch_size
        most = accelerator.gather(torch.tensor([len(queries)], device=args.device)).max().item()
        totals = {k: torch.zeros(3, dtype=torch.float64, device=args.device) for k in ks}  # correct, top-5, nll
        count = 0
        for start in range(0, most, chunk):
            local = queries[start : start + chunk].float()
            padding = chunk - len(local)  # every process sends a chunk of one size; label -1 marks the padding
            local = F.pad(local, (0, 0, 0, padding))
            labels = F.pad(query_labels[start : start + chunk], (0, padding), value=-1)
            all_queries, all_labels = accelerator.gather((local, labels))
            all_valid = all_labels >= 0
            values, neighbour_labels = self.local_neighbours(all_queries, largest_k)
            values, neighbour_labels = accelerator.gather((values[None], neighbour_labels[None]))  # (processes, q, k)
            values, order = values.permute(1, 0, 2).flatten(1).topk(largest_k, dim=1)
            neighbour_labels = neighbour_labels.permute(1, 0, 2).flatten(1).gather(1, order)
            all_labels, values, neighbour_labels = all_labels[all_valid], values[all_valid], neighbour_labels[all_valid]
            count += len(all_labels)
            for k in ks:
                votes = torch.zeros(len(all_labels), self.num_classes, dtype=torch.float64, device=args.device)
                votes.scatter_add_(1, neighbour_labels[:, :k], (values[:, :k].double() / temperature).exp())
                top1, top5 = top1_top5_hits(top5_indices(votes), all_labels)
                probabilities = votes / votes.sum(dim=1, keepdim=True)
                nll = -probabilities.gather(1, all_labels[:, None]).clamp_min(1e-12).log()
                totals[k] += torch.stack([top1.sum(), top5.sum(), nll.sum()]).double()
        metrics = {}
        for k in ks:
            accuracy, top5, loss = (totals[k] / count).tolist()
            metrics.update({f"eval_knn{k}_accuracy": accuracy, f"eval_knn{k}_top5": top5, f"eval_knn{k}_loss": loss})
        first = ks[0]  # the headline
        metrics.update(
            eval_accuracy=metrics[f"eval_knn{first}_accuracy"],
            eval_top5=metrics[f"eval_knn{first}_top5"],
            eval_loss=metrics[f"eval_knn{first}_loss"],
            eval_samples=count,
        )
        return metrics


def knn_evaluate(trainer: NepaTrainer, train_dataset, eval_dataset, num_classes: int, ks, temperature: float) -> tuple[KnnBank, dict]:
    bank = KnnBank.build(trainer, train_dataset, num_classes)
    queries, labels = encode_shard(trainer, eval_dataset, "k-NN queries")
    return bank, bank.evaluate(trainer, queries, labels, ks, temperature)


def sharded_rankme(trainer: NepaTrainer, features: torch.Tensor) -> float:
    """RankMe of the rows of every process's `features` together: the singular values come from the sum over
    processes of each shard's Gram matrix (width x width), so no process gathers the rows."""
    gram = features.double().T @ features.double()
    gram = trainer.accelerator.reduce(gram, reduction="sum")
    return rankme(torch.linalg.eigvalsh(gram).clamp_min(0).sqrt())


@contextlib.contextmanager
def untouched_random_state(device: torch.device):
    """Run the block and give back the process's `random`, numpy and torch (CPU and `device`) random states as they
    were: the block may load images (`ImageDataset` reseeds `random` and numpy) and start dataloaders (which draw a
    seed from torch's generator)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class KnnMonitor:
    """The k-NN and RankMe of a model while it trains (`train_pretrain.py --knn_eval_steps`): eval.py's k-NN protocol
    (`KNN_K`, `KNN_TEMPERATURE`, mean patch tokens of the model in eval mode, sharded across processes) on a bank of train
    images and queries of validation images, and RankMe of the bank's features; without labels (`queries` None),
    RankMe alone. With the trainer's EMA, the same again on the EMA's weights. The training is left as it was: the
    model's mode, its weights (the EMA is applied and taken off) and every random state."""

    def __init__(self, bank, queries, num_classes: int | None):
        self.bank, self.queries, self.num_classes = bank, queries, num_classes

    def evaluate(self, trainer: NepaTrainer, prefix: str) -> dict[str, float]:
        model = trainer.model
        training = model.training
        model.eval()
        try:
            with untouched_random_state(trainer.args.device):
                metrics = self.scores(trainer, prefix)
                if trainer.ema is not None:
                    with trainer.ema.applied():
                        metrics.update(self.scores(trainer, f"{prefix}_ema"))
        finally:
            model.train(training)
        return metrics

    def scores(self, trainer: NepaTrainer, prefix: str) -> dict[str, float]:
        features, labels = encode_shard(trainer, self.bank, "k-NN bank")
        metrics = {}
        if self.queries is not None:
            queries, query_labels = encode_shard(trainer, self.queries, "k-NN queries")
            knn = KnnBank(features, labels, self.num_classes).evaluate(trainer, queries, query_labels, [KNN_K], KNN_TEMPERATURE)
            metrics.update({f"{prefix}_knn_top1": knn["eval_accuracy"], f"{prefix}_knn_top5": knn["eval_top5"]})
        metrics[f"{prefix}_rankme"] = sharded_rankme(trainer, features)
        return metrics


def knn_monitor(dataset, data_args, train_samples: int, eval_samples: int, transform, seed: int) -> KnnMonitor:
    """The monitor of `train_pretrain.py --knn_eval_steps`: a bank of `train_samples` train images and
    `eval_samples` validation queries, picked as `eval.py --max_train_samples / --max_eval_samples` pick them
    (`get_split` with `seed`), so that eval.py on a checkpoint reproduces the figure logged at its step."""
    label_column = data_args.label_column_name
    bank_split = get_split(dataset, "train", train_samples, seed, label_column)
    if not has_class_labels(bank_split, label_column):
        logger.warning(
            "--knn_eval_steps: the train split has no class labels in column %r, and k-NN needs labels: logging "
            "rankme alone (name the labels' column with --label_column_name).", label_column,
        )  # fmt: skip
        return KnnMonitor(image_dataset(bank_split, transform, data_args, labels=False), None, None)
    try:
        query_split = get_split(dataset, "validation", eval_samples, seed, label_column)
    except KeyError as error:
        raise ValueError(
            f"--knn_eval_steps scores validation images against train images, and {error.args[0]} Give the dataset a "
            f"validation split (--validation_dir), or leave --knn_eval_steps out."
        ) from error
    bank = image_dataset(bank_split, transform, data_args)
    return KnnMonitor(bank, image_dataset(query_split, transform, data_args), num_classes(bank_split, label_column))


# --- probe heads --------------------------------------------------------------------------------------------------


class FrozenFeatureNorm(nn.Module):
    """A non-affine BatchNorm of frozen features (..., dim): in training, the statistics of the batch of every process
    together (the features carry no gradient, so the statistics need none), kept as running estimates for evaluation.
    Taken over all processes, they do not depend on how a batch is split, and neither does the probe."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training:
            flat = features.detach().reshape(-1, features.shape[-1]).double()
            sums = torch.cat([flat.sum(dim=0), flat.pow(2).sum(dim=0), flat.new_tensor([len(flat)])])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(sums)
            dim, count = features.shape[-1], sums[-1]
            mean = sums[:dim] / count
            var = (sums[dim : 2 * dim] / count - mean.pow(2)).clamp_min(0)
            self.running_mean.lerp_(mean.float(), self.momentum)
            self.running_var.lerp_((var * count / (count - 1).clamp_min(1)).float(), self.momentum)
            mean, var = mean.float(), var.float()
        else:
            mean, var = self.running_mean, self.running_var
        return ((features.float() - mean) * torch.rsqrt(var + self.eps)).to(features.dtype)


class AttentivePoolingHead(nn.Module):
    """AIM's attentive probe: tokens through a non-affine BatchNorm (statistics over the batch's tokens, of every
    process), one learned query attending over them with key and value projections (no query projection), then a
    linear classifier."""

    def __init__(self, hidden_size: int, num_heads: int, num_classes: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = FrozenFeatureNorm(hidden_size)
        self.query = nn.Parameter(torch.randn(1, 1, hidden_size) * 0.02)
        self.key = nn.Linear(hidden_size, hidden_size, bias=False)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, width = tokens.shape
        tokens = self.norm(tokens)
        heads = (batch, -1, self.num_heads, width // self.num_heads)
        query = self.query.expand(batch, -1, -1).reshape(heads).transpose(1, 2)
        key = self.key(tokens).reshape(heads).transpose(1, 2)
        value = self.value(tokens).reshape(heads).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(query, key.to(query.dtype), value.to(query.dtype))
        return self.classifier(pooled.transpose(1, 2).reshape(batch, width))


class ProbeGrid(nn.Module):
    """A frozen encoder and a grid of heads, each its own classifier: `protocol` "linear" builds one linear head per
    (feature, learning rate), "attentive" one attentive head per learning rate. `forward` returns the heads' logits
    (batch, heads, classes) and the sum of their cross-entropies."""

    def __init__(self, encoder: ViTNepaModel, protocol: str, num_classes: int, lrs, features=LINEAR_FEATURES, blocks=ATTENTIVE_BLOCKS):
        super().__init__()
        config = encoder.config
        self.encoder = encoder
        self.protocol = protocol
        self.names, self.lrs, self.inputs, heads = [], [], [], []
        if protocol == "linear":
            unknown = sorted(set(features) - set(LINEAR_FEATURES))
            if unknown or not features:
                raise ValueError(f"--linear_features {list(features)}: choose among {LINEAR_FEATURES}.")
            if "last4" in features and config.num_hidden_layers < 4:
                raise ValueError(
                    f"--linear_features last4 needs 4 blocks; the encoder has {config.num_hidden_layers}: leave last4 out."
                )
            self.features = tuple(dict.fromkeys(features))
            for feature in self.features:
                for lr in lrs:
                    width = config.hidden_size * (4 if feature == "last4" else 1)
                    linear = nn.Linear(width, num_classes)
                    nn.init.normal_(linear.weight, std=0.01)  # DINOv2's initialisation of its linear heads
                    nn.init.zeros_(linear.bias)
                    heads.append(nn.Sequential(FrozenFeatureNorm(width), linear))  # MAE's probe: BatchNorm first
                    self.names.append(f"{feature}_lr{lr:g}")
                    self.lrs.append(lr)
                    self.inputs.append(feature)
        elif protocol == "attentive":
            self.blocks = block_range(list(blocks), config.num_hidden_layers)
            for lr in lrs:
                heads.append(AttentivePoolingHead(config.hidden_size, config.num_attention_heads, num_classes))
                self.names.append(f"attentive_lr{lr:g}")
                self.lrs.append(lr)
                self.inputs.append("tokens")
        else:
            raise ValueError(f"no probe grid for protocol {protocol!r}: use linear or attentive.")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"the probe learning rates repeat a value: {list(lrs)}.")
        self.heads = nn.ModuleList(heads)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, drop path or RoPE augmentation, whatever the Trainer asks
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        with torch.no_grad():
            if self.protocol == "linear":
                inputs = pooled_features(self.encoder, pixel_values, self.features)
            else:
                inputs = {"tokens": block_tokens(self.encoder, pixel_values, self.blocks)}
        logits = torch.stack([head(inputs[name]) for head, name in zip(self.heads, self.inputs)], dim=1)
        loss = None
        if labels is not None:  # the sum over heads of each head's mean cross-entropy
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat_interleave(len(self.heads))) * len(self.heads)
        return {"loss": loss, "logits": logits}


# --- training and evaluating the grid under the Trainer ---------------------------------------------------------


class HeadGradientClipping(TrainerCallback):
    """Clip each head's gradient norm on its own to `max_grad_norm` (clipping all heads together would let one head's
    large gradient shrink the others' steps)."""

    def __init__(self, trainer: "ProbeTrainer", max_grad_norm: float):
        self.trainer, self.max_grad_norm = trainer, max_grad_norm

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for head in self.trainer.grid.heads:
            torch.nn.utils.clip_grad_norm_(head.parameters(), self.max_grad_norm)


class ProbeTrainer(NepaTrainer):
    """Trains a `ProbeGrid`: one optimiser parameter group per head (weight decay on its matrices and on nothing else)
    at the head's learning rate; `--max_grad_norm` clips each head separately; `--lr_scheduler_type cosine` ends at
    `min_lr` (absolute, the same for every head), other schedules are the Trainer's. Evaluation reports every head
    (`eval_<head>_accuracy`, `_top5`, `_loss`) and the best by top-1 as `eval_accuracy`, `eval_top5`, `eval_loss`,
    naming it in `eval_best_head`."""

    def __init__(self, *args, min_lr: float = 0.0, **kwargs):
        super().__init__(*args, compute_metrics=self.head_metrics, preprocess_logits_for_metrics=top5_and_nll, **kwargs)
        self.grid: ProbeGrid = self.model
        self.min_lr = min_lr
        if self.args.max_grad_norm:
            self.add_callback(HeadGradientClipping(self, self.args.max_grad_norm))
            self.args.max_grad_norm = 0.0  # the Trainer's own clipping would take all heads' norm together

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = []
            for head, lr in zip(self.grid.heads, self.grid.lrs):
                matrices = [p for p in head.parameters() if p.ndim >= 2]
                others = [p for p in head.parameters() if p.ndim < 2]
                groups.append({"params": matrices, "lr": lr, "weight_decay": self.args.weight_decay})
                if others:
                    groups.append({"params": others, "lr": lr, "weight_decay": 0.0})
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.args.lr_scheduler_type == "cosine":
            optimizer = optimizer or self.optimizer
            warmup = self.args.get_warmup_steps(num_training_steps)
            lambdas = [
                partial(warmup_cosine, warmup_steps=warmup, total_steps=num_training_steps, floor=min(1.0, self.min_lr / group["lr"]))
                for group in optimizer.param_groups
            ]
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        elif self.min_lr:
            raise ValueError(f"--probe_min_lr {self.min_lr} needs --lr_scheduler_type cosine, not {self.args.lr_scheduler_type}.")
        return super().create_scheduler(num_training_steps, optimizer)

    def head_metrics(self, prediction) -> dict:
        (top5, nll), labels = prediction.predictions, np.asarray(prediction.label_ids)
        top1, top5 = (hits.mean(axis=0) for hits in top1_top5_hits(top5, labels[:, None]))
        loss = nll.mean(axis=0)
        metrics = {}
        for index, name in enumerate(self.grid.names):
            metrics.update({f"{name}_accuracy": float(top1[index]), f"{name}_top5": float(top5[index]), f"{name}_loss": float(loss[index])})
        best = int(np.argmax(top1))  # the first of equals: the lowest learning rate of the first feature
        # "loss" becomes eval_loss, replacing the Trainer's (the sum over heads) with the best head's.
        metrics.update(accuracy=float(top1[best]), top5=float(top5[best]), loss=float(loss[best]))
        metrics.update(best_head=self.grid.names[best], best_lr=self.grid.lrs[best], best_input=self.grid.inputs[best])
        return metrics

    def write_table(self, metrics: dict, path) -> None:
        """The heads' table (markdown), best first."""
        rows = sorted(self.grid.names, key=lambda name: -metrics[f"eval_{name}_accuracy"])
        lines = ["| head | input | lr | top-1 % | top-5 % | loss |", "|---|---|---|---|---|---|"]
        for name in rows:
            index = self.grid.names.index(name)
            lines.append(
                f"| {name} | {self.grid.inputs[index]} | {self.grid.lrs[index]:g} | {100 * metrics[f'eval_{name}_accuracy']:.2f} "
                f"| {100 * metrics[f'eval_{name}_top5']:.2f} | {metrics[f'eval_{name}_loss']:.4f} |"
            )
        with open(path, "w") as file:
            file.write("\n".join(lines) + "\n")
