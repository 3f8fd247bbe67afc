"""The miniature's settings, in one place: the tiny ViT (patch 7) on 28 px Fashion-MNIST, on the CPU.

The studies under experiments/ (the demo, the ablation tables, the segmentation demo's pretraining, the probe study,
the small-data sweep, the pretraining-length and layer-decay studies) build their entry-point command lines from
these (`pretrain_argv`, `convert_argv`, `probe_argv`, `finetune_argv`), so that their tables are measured the same
way. The fine-tuning settings were chosen by the sweep in docs/miniature.md (which also says how each was measured).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = "configs/pretrain/nepa-tiny-patch7-28"
FINETUNE_CONFIG = "configs/finetune/nepa-tiny-patch7-28-sft"
DATASET = "data/fashion-mnist-hf"
PRETRAIN_STEPS = 2000

# NEPA pretraining: the paper's optimiser (AdamW, beta2 0.95, cosine) at a small-batch learning rate, on
# crops of at least half the image (an 8 % crop of 28 px is 8 x 8 pixels; (0.5, 1) gave +3 k-NN points).
PRETRAIN = {
    "per_device_train_batch_size": 128,
    "learning_rate": 1.5e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.05,
    "adam_beta2": 0.95,
    "crop_scale": (0.5, 1.0),
    "use_ema": False,
}

# Fine-tuning on 28 px images, from the sweep in docs/miniature.md: a plain fine-tune (whole image and flip,
# AdamW lr 1e-3, no layer decay, no label smoothing, drop path, RandAugment, mixup / cutmix or erasing) fitted
# 7 to 8 points better in the same steps than the regularised ImageNet-style recipe, for both encoders.
# The patch projection is trained: NEPA's is anisotropic (effective rank 55 of 128, against 98 untrained).
# EMA off: at a few hundred steps an average over ~10k steps is the initial weights.
FINETUNE = {
    "per_device_train_batch_size": 64,
    "learning_rate": 1e-3,
    "head_lr": 1e-3,
    "llrd": 1.0,
    "warmup_steps": 0.1,
    "weight_decay": 0.05,
    "drop_path": 0.0,
    "crop_scale": (1.0, 1.0),
    "crop_ratio": (1.0, 1.0),
    "aa": "",
    "mixup": 0,
    "cutmix": 0,
    "reprob": 0,
    "smoothing": 0.0,
    "freeze_embed": False,
    "use_ema": False,
}
# Steps per labelled percentage of each class: what a 10-minute demo on two CPU cores can pay for
# (300 steps are 32 epochs of the 600 images of 1 %, 600 are 6.4 epochs of the 6,000 of 10 %).
FINETUNE_STEPS = {1: 300, 10: 600, 100: 1200}
# The demo's own fine-tunes: half of those, measured against them in docs/miniature.md ("How the demo's 10 minutes
# are split"). After 300 / 600 steps random init had caught up with NEPA at 10 % of the labels; after 150 / 300 NEPA
# is ahead in every seed and column, and the demo has minutes to spare.
DEMO_FINETUNE_STEPS = {1: 150, 10: 300, 100: 600}

# 28 px images have no border to crop away: evaluate on the whole image.
EVAL = {"crop_pct": 1.0, "per_device_eval_batch_size": 512}

# The frozen-encoder probes of eval.py (docs/miniature.md): 2 epochs of the 10 % labelled subset (94 steps; what
# the demo's time and a 3-seed comparison on the 2-core CPU can pay for), on crops of at least half the image, no
# checkpoints. The linear probe takes the default grid. The attentive probe averages the last 2 of the 4 blocks
# (AIM: 6 of 24, ViT-B here: 6 of 12), takes no RandAugment (made for 100 epochs, not 2), and a grid 10x AIMv2's:
# with AIMv2's, made for 100 epochs, the best head of both encoders was its largest rate, 2e-3.
PROBE_LINEAR = {
    "num_train_epochs": 2,
    "per_device_train_batch_size": 128,
    "crop_scale": (0.5, 1.0),
    "save_strategy": "no",
}
PROBE_ATTENTIVE = {
    **PROBE_LINEAR,
    "attentive_blocks": 2,
    "aa": "",
    "optim": "adamw_torch",
    "weight_decay": 0.05,
    "max_grad_norm": 3.0,
    "warmup_steps": 0.05,
    "probe_min_lr": 1e-5,
    "probe_lrs": (5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2),
}
PROBES = {"knn": {}, "linear": PROBE_LINEAR, "attentive": PROBE_ATTENTIVE}
PROBE_LABELS_PERCENT = 10  # the probes' labelled subset: 10 % of each class


def flags(settings: dict) -> list[str]:
    """{"crop_scale": (0.5, 1.0), "aa": ""} -> ["--crop_scale", "0.5", "1.0", "--aa", ""]."""
    argv = []
    for key, value in settings.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        argv += [f"--{key}", *(str(item) for item in values)]
    return argv


def labels_flags(percent: float) -> list[str]:
    """The labelled subset of `percent` % of each class (100: the whole train split)."""
    return [] if percent >= 100 else ["--labels_per_class", str(percent / 100)]


def pretrain_argv(output_dir, steps: int, seed: int = 0, dataset: str = DATASET, config: str = PRETRAIN_CONFIG,
                  config_overrides: str = "", logging_steps: int = 50, save_steps: int | None = None) -> list[str]:  # fmt: skip
    """train_pretrain.py's command line: NEPA pretraining of `config` (changed by `config_overrides`) for `steps`,
    saving a checkpoint every `save_steps` (None: the final weights only)."""
    saving = ["--save_strategy", "steps", "--save_steps", str(save_steps)] if save_steps else ["--save_strategy", "no"]
    return [
        "--config_name", str(REPO / config), *(["--config_overrides", config_overrides] if config_overrides else []),
        "--dataset_name", dataset, "--load_from_disk", "True",
        "--output_dir", str(output_dir), "--do_train", "--max_steps", str(steps),
        *flags(PRETRAIN),
        "--seed", str(seed), *saving, "--logging_steps", str(logging_steps),
    ]  # fmt: skip


def convert_argv(encoder, classifier, config: str | None = FINETUNE_CONFIG, dataset: str | None = None) -> list[str]:
    """init_nepa_cls_from_pretrain.py's command line: the classifier of `encoder`, saved to `classifier`, with the
    settings of `config` (None: the encoder's own) and, with `dataset`, the class count of that dataset."""
    return [
        "--pretrained_model_id", str(encoder), *(["--config_model_id", str(REPO / config)] if config else []),
        *(["--dataset_name", str(dataset)] if dataset else []), "--save_local", "--local_dir", str(classifier),
    ]  # fmt: skip


def probe_argv(encoder, output_dir, protocol: str, seed: int, dataset: str = DATASET) -> list[str]:
    """eval.py's command line: a frozen-encoder probe of `encoder` fitted on PROBE_LABELS_PERCENT % of the labels,
    scored on the whole test split."""
    return [
        "--model_name_or_path", str(encoder), "--protocol", protocol,
        "--dataset_name", dataset, "--load_from_disk", "True",
        *labels_flags(PROBE_LABELS_PERCENT), *flags(EVAL), *flags(PROBES[protocol]),
        "--output_dir", str(output_dir), "--seed", str(seed),
    ]  # fmt: skip


def finetune_argv(classifier, output_dir, percent: float, seed: int, steps: int | None = None, dataset: str = DATASET) -> list[str]:
    """train_finetune.py's command line: fine-tune on `percent` % of the labels, evaluate on the whole test split."""
    steps = FINETUNE_STEPS[percent] if steps is None else steps
    return [
        "--model_name_or_path", str(classifier),
        "--dataset_name", dataset, "--load_from_disk", "True",
        "--output_dir", str(output_dir),
        "--do_train", "--do_eval", "--max_steps", str(steps),
        *labels_flags(percent),
        *flags(FINETUNE), *flags(EVAL),
        "--seed", str(seed), "--save_strategy", "no", "--logging_steps", str(max(1, steps // 5)),
    ]  # fmt: skip


def save_untrained_encoder(folder, seed: int = 0, **config_overrides) -> None:
    """The random-init baseline: the miniature's encoder (with `config_overrides`), never trained, saved like a
    pretraining output."""
    import torch
    from transformers import AutoImageProcessor

    from models.vit_nepa import ViTNepaConfig, ViTNepaForPreTraining

    config = REPO / PRETRAIN_CONFIG
    torch.manual_seed(seed)
    ViTNepaForPreTraining(ViTNepaConfig.from_pretrained(config, **config_overrides)).save_pretrained(folder)
    AutoImageProcessor.from_pretrained(config).save_pretrained(folder)
