"""Fine-tune a ViT-NEPA classifier with the paper's recipe.

    python train_finetune.py --model_name_or_path outputs/nepa-b-cls \
        --dataset_name data/imagenet-1k-hf --load_from_disk True --output_dir outputs/nepa-b-sft ...

The recipe: timm RandAugment + bicubic RandomResizedCrop + random erasing, mixup / cutmix with label
smoothing, layer-wise lr decay with a separate head lr and per-group warm-up, an EMA of the weights
evaluated beside the raw ones. `--freeze_vit True` is a linear probe. `--labels_per_class N` (or a fraction)
trains on a seeded class-balanced labelled subset, the semi-supervised protocol; evaluation stays on the whole
validation split. `--crop_scale` / `--crop_ratio` set the training crop. The architecture is the classifier
folder's config; `--config_overrides` changes it (`--drop_path`, `--is_causal` spell two of its fields).
Every `TrainingArguments` flag works, but the schedule is always one of the release's two layer-wise cosines
(`--lr_scheduler_type` other than cosine is refused): `llrd_cosine_warmup` (the release scripts' constant decay,
the default) or `llrd_cosine` (one warm-up for every group; with `--llrd_end` the decay ramps from `--llrd` to it,
the paper's main-table recipe), named as the release names them in `--lr_scheduler_kwargs`. A run started again
with the same command resumes from its newest complete checkpoint.
"""

import logging
from dataclasses import dataclass

from transformers import SchedulerType, set_seed

from models.vit_nepa import ViTNepaForImageClassification
from nepa.args import (
    EVALUATING,
    TRAINING,
    DataArguments,
    NepaTrainingArguments,
    Use,
    config_overrides_field,
    configure_logging,
    crop_pct_field,
    option,
    parse_arguments,
    resize_size_field,
)
from nepa.checkpoint import load_config, load_image_processor, load_model
from nepa.data import (
    RAND_AUGMENT,
    BatchAugment,
    EvalTransform,
    FinetuneTransform,
    check_labels_fit,
    get_split,
    image_dataset,
    load_image_dataset,
    processor_image_size,
    training_split,
)
from nepa.metrics import accuracy_metrics, top5_and_nll
from nepa.optim import layer_decay_cosine_schedule, layer_decay_param_groups, layer_decay_ramp, layer_decay_ramp_schedule
from nepa.trainer import NepaTrainer, image_inputs, resume_checkpoint, train_and_evaluate

logger = logging.getLogger("train_finetune")


@dataclass
class FinetuneArguments:
    model_name_or_path: str = option(help="A classifier folder (init_nepa_cls_from_pretrain.py writes one).")
    model_revision: str | None = option(
        None, "The Hub revision the folder was downloaded from (the release's commands pass `init`)."
    )
    image_processor_name: str | None = option(None, "Default: --model_name_or_path.")
    freeze_embed: bool = option(True, "Freeze the patch projection.")
    freeze_vit: bool = option(False, "Linear probe: train only fc_norm and the classifier.")
    freeze_vit_layers: int = option(0, "Freeze the embeddings and the first N layers.")
    config_overrides: str | None = config_overrides_field()
    drop_path: float | None = option(None, "Stochastic depth of the last layer: --config_overrides drop_path_prob=X.")
    is_causal: bool | None = option(None, "Causal attention while fine-tuning: --config_overrides is_causal=X.")
    llrd: float = option(0.65, "Layer-wise lr decay (1 = none); with --llrd_end, where it starts.")
    llrd_end: float | None = option(
        None,
        "Ramp the layer-wise decay from --llrd to this over the run, along a half-cosine, under the "
        "llrd_cosine schedule (the paper's ViT-B recipe: --llrd 0.35 --llrd_end 1.0). The same as the release's "
        "--lr_scheduler_kwargs '{\"custom_scheduler_type\": \"llrd_cosine\", \"llrd_end\": X}'.",
    )
    head_lr: float | None = option(
        1e-3, "Learning rate of the classifier and the final norm (fc_norm gets --learning_rate)."
    )
    crop_pct: float = crop_pct_field()
    resize_size: int | None = resize_size_field()
    aa: str | None = option(RAND_AUGMENT, "timm RandAugment policy ('' for none).")
    reprob: float = option(0.25, "Random erasing probability.")
    mixup: float = option(0.8, "Mixup alpha (0 = off).")
    cutmix: float = option(1.0, "CutMix alpha (0 = off).")
    mixup_prob: float = option(1.0, "Probability of mixing a batch.")
    mixup_switch_prob: float = option(0.5, "Probability of cutmix instead of mixup.")
    smoothing: float = option(0.1, "Label smoothing.")


# The release's two layer-wise schedules, as its commands name them in --lr_scheduler_kwargs' custom_scheduler_type.
CONSTANT_DECAY, DECAY_RAMP = "llrd_cosine_warmup", "llrd_cosine"


@dataclass
class FinetuneTrainingArguments(NepaTrainingArguments):
    lr_scheduler_type: SchedulerType | str = option(
        "cosine", "cosine only: one of the release's layer-wise cosines, which --lr_scheduler_kwargs names."
    )

    def __post_init__(self):
        super().__post_init__()
        if self.lr_scheduler_type != SchedulerType.COSINE:
            raise ValueError(
                f"--lr_scheduler_type {self.lr_scheduler_type.value}: train_finetune.py schedules the release's way, a "
                f"half-cosine after a linear warm-up per layer group (--warmup_steps / --warmup_ratio set it; "
                f"--lr_scheduler_kwargs chooses which of its two layer-wise cosines). "
                f"Leave the flag out or pass cosine."
            )
        kwargs = self.lr_scheduler_kwargs or {}
        takes = {CONSTANT_DECAY: set(), DECAY_RAMP: {"llrd_end"}}.get(kwargs.get("custom_scheduler_type", CONSTANT_DECAY))
        end = kwargs.get("llrd_end", 1.0)
        if takes is None or not set(kwargs) - {"custom_scheduler_type"} <= takes or type(end) not in (int, float):
            raise ValueError(
                f"--lr_scheduler_kwargs {kwargs}: train_finetune.py takes the release's two layer-wise cosines, "
                f'{{"custom_scheduler_type": "{CONSTANT_DECAY}"}} (constant --llrd, each group warmed up over its own '
                f'steps; the default) or {{"custom_scheduler_type": "{DECAY_RAMP}", "llrd_end": 1.0}} (the decay ramps '
                f"from --llrd to llrd_end, one warm-up for every group), and no other arguments."
            )


WITHOUT_FREEZE_VIT = Use(
    "is used only with --do_train and without --freeze_vit True (which freezes the whole encoder)",
    lambda a: a.do_train and not a.freeze_vit,
)
# Where each flag of train_finetune.py applies beyond nepa.args' shared table (parse_arguments refuses it elsewhere).
FLAG_USES = {
    **dict.fromkeys(("llrd", "llrd_end", "head_lr", "aa", "reprob", "mixup", "cutmix", "smoothing", "freeze_vit"), TRAINING),
    "freeze_embed": WITHOUT_FREEZE_VIT,
    "freeze_vit_layers": WITHOUT_FREEZE_VIT,
    "mixup_prob": Use("is used only with --do_train and --mixup or --cutmix above 0", lambda a: a.do_train and (a.mixup > 0 or a.cutmix > 0)),
    "mixup_switch_prob": Use("is used only with --do_train and both --mixup and --cutmix above 0", lambda a: a.do_train and a.mixup > 0 and a.cutmix > 0),
    "crop_pct": EVALUATING,
    "resize_size": EVALUATING,
}


def layer_decay_end(args: FinetuneArguments, training_args: FinetuneTrainingArguments) -> float | None:
    """Where the decay ends under `llrd_cosine` (--llrd_end or --lr_scheduler_kwargs' llrd_end; --llrd, constant,
    when neither is given), or None for `llrd_cosine_warmup`. --llrd_end alone selects `llrd_cosine`."""
    kwargs = training_args.lr_scheduler_kwargs or {}
    named = kwargs.get("custom_scheduler_type")
    if args.llrd_end is not None and kwargs.get("llrd_end", args.llrd_end) != args.llrd_end:
        raise ValueError(f"--llrd_end {args.llrd_end} and --lr_scheduler_kwargs' llrd_end {kwargs['llrd_end']} disagree: pass one.")
    if args.llrd_end is not None and named == CONSTANT_DECAY:
        raise ValueError(
            f"--llrd_end {args.llrd_end} ramps the decay under {DECAY_RAMP}, but --lr_scheduler_kwargs names "
            f"{CONSTANT_DECAY}, which keeps it constant: leave --lr_scheduler_kwargs out, or name {DECAY_RAMP}."
        )
    if named != DECAY_RAMP and args.llrd_end is None:
        return None
    if args.llrd <= 0:
        raise ValueError(f"--llrd {args.llrd} under {DECAY_RAMP}: the decay ramps from --llrd, which must be above 0.")
    end = kwargs.get("llrd_end", args.llrd_end)
    return args.llrd if end is None else float(end)


def load_classifier(args: FinetuneArguments) -> ViTNepaForImageClassification:
    flag = "--model_name_or_path"
    config = load_config(args.model_name_or_path, flag, args.config_overrides, args.model_revision, drop_path_prob=args.drop_path, is_causal=args.is_causal)
    return load_model(
        ViTNepaForImageClassification, args.model_name_or_path, flag, "classifier",
        "it is a pretraining checkpoint. Convert it first with init_nepa_cls_from_pretrain.py.", config=config,
    )  # fmt: skip


def freeze(model: ViTNepaForImageClassification, args: FinetuneArguments) -> None:
    backbone = model.vit_nepa
    if args.freeze_vit:
        backbone.requires_grad_(False)
        return
    if args.freeze_embed:
        backbone.embeddings.patch_embeddings.requires_grad_(False)
    if args.freeze_vit_layers:
        backbone.embeddings.requires_grad_(False)
        for layer in backbone.encoder.layer[: args.freeze_vit_layers]:
            layer.requires_grad_(False)


def batch_augment(args: FinetuneArguments, num_labels: int, device) -> BatchAugment | None:
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing

    erasing = RandomErasing(args.reprob, mode="pixel", max_count=1, device=device) if args.reprob > 0 else None
    mixup = None
    if args.mixup > 0 or args.cutmix > 0 or args.smoothing > 0:
        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            prob=args.mixup_prob if args.mixup > 0 or args.cutmix > 0 else 0.0,  # smoothing alone: timm asserts otherwise
            switch_prob=args.mixup_switch_prob,
            label_smoothing=args.smoothing,
            num_classes=num_labels,
        )
    return BatchAugment(erasing, mixup) if erasing or mixup else None


class FinetuneTrainer(NepaTrainer):
    """Layer-wise lr decay groups with a separate head lr, under the per-group warm-up cosine (`layer_decay_end`
    None) or the decay ramp to `layer_decay_end`, whose current decay each logging line adds as `layer_decay`."""

    def __init__(self, *args, layer_decay: float, head_lr: float | None, layer_decay_end: float | None = None, **kwargs):
        self.layer_decay = layer_decay
        self.layer_decay_end = layer_decay_end
        self.head_lr = head_lr
        super().__init__(*args, **kwargs)

    def parameter_groups(self, model):
        return layer_decay_param_groups(model, self.args.learning_rate, self.args.weight_decay, self.layer_decay, self.head_lr)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            warmup = self.args.get_warmup_steps(num_training_steps)
            if self.layer_decay_end is None:
                self.lr_scheduler = layer_decay_cosine_schedule(optimizer, warmup, num_training_steps)
            else:
                self.lr_scheduler = layer_decay_ramp_schedule(optimizer, warmup, num_training_steps, self.layer_decay, self.layer_decay_end)
        return self.lr_scheduler

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "learning_rate" in logs and self.layer_decay_end is not None:  # the decay of the step that lr was logged for
            step = self.state.global_step - 1
            logs["layer_decay"] = layer_decay_ramp(step, self.state.max_steps, self.layer_decay, self.layer_decay_end)
        super().log(logs, start_time)


def main(argv: list[str] | None = None) -> dict:
    args, data_args, training_args = parse_arguments(
        (FinetuneArguments, DataArguments, FinetuneTrainingArguments), argv, FLAG_USES
    )
    configure_logging(training_args)
    decay_end = layer_decay_end(args, training_args)
    set_seed(training_args.seed)

    # Everything that can be wrong with the arguments fails here, before the images are read.
    model = load_classifier(args)
    freeze(model, args)
    processor = load_image_processor(args.image_processor_name, args.model_name_or_path)
    size = processor_image_size(processor, model.config.patch_size)
    checkpoint = resume_checkpoint(training_args)
    dataset = load_image_dataset(data_args)
    train_split = training_split(dataset, data_args, training_args.seed)
    check_labels_fit(train_split, data_args.label_column_name, model.config.num_labels, data_args.dataset_name)
    transform = FinetuneTransform(size, args.aa, processor.image_mean, data_args.crop_scale, data_args.crop_ratio)
    train_dataset = image_dataset(train_split, transform, data_args) if training_args.do_train else None
    eval_dataset = None
    if training_args.do_eval:
        eval_split = get_split(dataset, "validation", data_args.max_eval_samples, training_args.seed, data_args.label_column_name)
        eval_dataset = image_dataset(eval_split, EvalTransform(size, args.resize_size, args.crop_pct), data_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("fine-tuning %.2fM of %.2fM parameters", trainable / 1e6, model.num_parameters() / 1e6)

    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        **image_inputs(processor, train_dataset, eval_dataset),
        batch_augment=batch_augment(args, model.config.num_labels, training_args.device),
        compute_metrics=accuracy_metrics,
        preprocess_logits_for_metrics=top5_and_nll,
        layer_decay=args.llrd,
        head_lr=args.head_lr,
        layer_decay_end=decay_end,
    )
    return train_and_evaluate(trainer, processor, checkpoint, args.model_name_or_path)


if __name__ == "__main__":
    main()
