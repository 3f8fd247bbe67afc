"""Fine-tune a ViT-NEPA classifier with the paper's recipe.

    python train_finetune.py --model_name_or_path outputs/nepa-b-cls \
        --dataset_name data/imagenet-1k-hf --load_from_disk True --output_dir outputs/nepa-b-sft ...

The recipe: timm RandAugment + bicubic RandomResizedCrop + random erasing, mixup / cutmix with label
smoothing, layer-wise lr decay with a separate head lr and per-group warm-up, an EMA of the weights
evaluated beside the raw ones. `--freeze_vit True` is a linear probe. `--labels_per_class N` (or a fraction)
trains on a seeded class-balanced labelled subset, the semi-supervised protocol; evaluation stays on the whole
validation split. `--crop_scale` / `--crop_ratio` set the training crop. Every `TrainingArguments` flag
works; a run started again with the same command resumes from its newest complete checkpoint.
"""

import logging
from dataclasses import dataclass, field

from transformers import AutoImageProcessor, set_seed

from models.vit_nepa import ViTNepaForImageClassification
from nepa.args import DataArguments, NepaTrainingArguments, configure_logging, parse_arguments
from nepa.data import (
    BatchAugment,
    BatchNormalize,
    EvalTransform,
    FinetuneTransform,
    ImageDataset,
    collate_images,
    get_split,
    label_names,
    load_image_dataset,
    processor_image_size,
    training_split,
)
from nepa.metrics import accuracy_metrics, top5_indices
from nepa.optim import layer_decay_cosine_schedule, layer_decay_param_groups
from nepa.trainer import NepaTrainer, resume_checkpoint, train_and_evaluate

logger = logging.getLogger("train_finetune")


@dataclass
class FinetuneArguments:
    model_name_or_path: str = field(metadata={"help": "A classifier folder (init_nepa_cls_from_pretrain.py writes one)."})
    image_processor_name: str | None = field(default=None, metadata={"help": "Default: --model_name_or_path."})
    freeze_embed: bool = field(default=True, metadata={"help": "Freeze the patch projection."})
    freeze_vit: bool = field(default=False, metadata={"help": "Linear probe: train only fc_norm and the classifier."})
    freeze_vit_layers: int = field(default=0, metadata={"help": "Freeze the embeddings and the first N layers."})
    drop_path: float = field(default=0.1, metadata={"help": "Stochastic depth of the last layer."})
    is_causal: bool = field(default=False, metadata={"help": "Keep causal attention while fine-tuning."})
    llrd: float = field(default=0.65, metadata={"help": "Layer-wise lr decay (1 = none)."})
    head_lr: float | None = field(default=1e-3, metadata={"help": "Learning rate of the final norm, fc_norm and classifier."})
    crop_pct: float = field(default=0.875, metadata={"help": "Eval: resize the shorter side to size / crop_pct, centre-crop."})
    resize_size: int | None = field(default=None, metadata={"help": "Eval: resize to this instead (overrides crop_pct)."})
    aa: str | None = field(default="rand-m9-mstd0.5-inc1", metadata={"help": "timm RandAugment policy ('' for none)."})
    reprob: float = field(default=0.25, metadata={"help": "Random erasing probability."})
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha (0 = off)."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (0 = off)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of cutmix instead of mixup."})
    smoothing: float = field(default=0.1, metadata={"help": "Label smoothing."})


def load_classifier(args: FinetuneArguments) -> ViTNepaForImageClassification:
    model, info = ViTNepaForImageClassification.from_pretrained(
        args.model_name_or_path, drop_path_prob=args.drop_path, is_causal=args.is_causal, output_loading_info=True
    )
    missing = info["missing_keys"]
    if missing:
        raise ValueError(
            f"{args.model_name_or_path} lacks {len(missing)} classifier tensors ({', '.join(sorted(missing)[:4])}): "
            f"it is a pretraining checkpoint. Convert it first with init_nepa_cls_from_pretrain.py."
        )
    return model


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
    """Layer-wise lr decay groups with a separate head lr, and the per-group warm-up cosine schedule."""

    def __init__(self, *args, layer_decay: float, head_lr: float | None, **kwargs):
        self.layer_decay = layer_decay
        self.head_lr = head_lr
        super().__init__(*args, **kwargs)

    def parameter_groups(self, model):
        return layer_decay_param_groups(model, self.args.learning_rate, self.args.weight_decay, self.layer_decay, self.head_lr)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = layer_decay_cosine_schedule(optimizer, warmup, num_training_steps)
        return self.lr_scheduler


def main(argv: list[str] | None = None) -> dict:
    args, data_args, training_args = parse_arguments((FinetuneArguments, DataArguments, NepaTrainingArguments), argv)
    configure_logging(training_args)
    set_seed(training_args.seed)

    # Everything that can be wrong with the arguments fails here, before the images are read.
    model = load_classifier(args)
    freeze(model, args)
    processor = AutoImageProcessor.from_pretrained(args.image_processor_name or args.model_name_or_path)
    size = processor_image_size(processor, model.config.patch_size)
    checkpoint = resume_checkpoint(training_args)
    dataset = load_image_dataset(data_args)
    train_split = training_split(dataset, data_args, training_args.seed)
    names = label_names(train_split, data_args.label_column_name)
    if names is not None and len(names) > model.config.num_labels:
        raise ValueError(
            f"the dataset has {len(names)} classes but the classifier has num_labels={model.config.num_labels}: "
            f"convert again with --dataset_name {data_args.dataset_name} (or --num_labels {len(names)})."
        )

    if names is None and data_args.label_column_name in train_split.column_names:  # plain integers: check the largest
        largest = max(train_split[data_args.label_column_name])
        if largest >= model.config.num_labels:
            raise ValueError(
                f"the dataset has label {largest} but the classifier has num_labels={model.config.num_labels} "
                f"(labels 0..{model.config.num_labels - 1}): convert again with --num_labels {largest + 1}."
            )

    columns = dict(image_column=data_args.image_column_name, label_column=data_args.label_column_name, strict=data_args.strict_images)
    transform = FinetuneTransform(size, args.aa, processor.image_mean, data_args.crop_scale, data_args.crop_ratio)
    train_dataset = ImageDataset(train_split, transform, **columns) if training_args.do_train else None
    eval_dataset = None
    if training_args.do_eval:
        eval_split = get_split(dataset, "validation", data_args.max_eval_samples, training_args.seed)
        eval_dataset = ImageDataset(eval_split, EvalTransform(size, args.resize_size, args.crop_pct), **columns)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("fine-tuning %.2fM of %.2fM parameters", trainable / 1e6, model.num_parameters() / 1e6)

    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_images,
        normalize=BatchNormalize(processor.image_mean, processor.image_std),
        batch_augment=batch_augment(args, model.config.num_labels, training_args.device),
        compute_metrics=accuracy_metrics,
        preprocess_logits_for_metrics=top5_indices,
        layer_decay=args.llrd,
        head_lr=args.head_lr,
    )
    return train_and_evaluate(trainer, processor, checkpoint)


if __name__ == "__main__":
    main()
