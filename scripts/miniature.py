"""The miniature's settings, in one place: the tiny ViT on 28 px Fashion-MNIST, on the CPU.

scripts/demo.py and scripts/ablations/run.py build their entry-point command lines from these, so the
demo's table and the ablation tables are measured the same way. The fine-tuning settings were chosen by
the sweep in docs/miniature.md (which also says how each was measured).
"""

PRETRAIN_CONFIG = "configs/pretrain/nepa-tiny-patch4-28"
FINETUNE_CONFIG = "configs/finetune/nepa-tiny-patch4-28-sft"
DATASET = "data/fashion-mnist-hf"
PRETRAIN_STEPS = 600

# NEPA pretraining: the paper's optimiser (AdamW, beta2 0.95, cosine) at a small-batch learning rate.
PRETRAIN = {
    "per_device_train_batch_size": 128,
    "learning_rate": 1.5e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.05,
    "adam_beta2": 0.95,
    "use_ema": False,
}

# Fine-tuning on 28 px images, from the sweep in docs/miniature.md: a crop of at least half the image (an
# 8 % crop of 28 px is 8 x 8 pixels), no RandAugment / mixup / cutmix / random erasing (RandAugment cost
# 8 points at this budget), twice the learning rate of the first guess; label smoothing, drop path and
# layer-wise decay kept (removing them together cost 2.5 points). The patch projection stays frozen (no
# difference measured). EMA off: at a few hundred steps an average over ~10k steps is the initial weights.
FINETUNE = {
    "per_device_train_batch_size": 64,
    "learning_rate": 4e-3,
    "head_lr": 4e-3,
    "llrd": 0.75,
    "warmup_steps": 0.1,
    "weight_decay": 0.05,
    "drop_path": 0.1,
    "crop_scale": (0.5, 1.0),
    "aa": "",
    "mixup": 0,
    "cutmix": 0,
    "reprob": 0,
    "smoothing": 0.1,
    "freeze_embed": True,
    "use_ema": False,
}
# Steps per labelled percentage of each class. Accuracy was still climbing at the sweep's longest run
# (300 steps: +9 points over 150); these are what a 10-minute demo on two CPU cores can pay for.
FINETUNE_STEPS = {1: 150, 10: 300, 100: 600}

# 28 px images have no border to crop away: evaluate on the whole image.
EVAL = {"crop_pct": 1.0, "per_device_eval_batch_size": 512}


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
