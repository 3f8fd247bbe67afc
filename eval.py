"""Evaluate a ViT-NEPA checkpoint on the validation split.

    python eval.py --model_name_or_path outputs/nepa-b-sft --dataset_name data/imagenet-1k-hf \
        --load_from_disk True --output_dir outputs/eval-nepa-b

Protocols (`--protocol`):

- `finetuned` (default): the classifier's predictions: `eval_accuracy` (top-1), `eval_top5`, `eval_loss`, and the
  same with `eval_ema_` when the folder has EMA weights.
- `knn`: DINO's weighted k-NN on the frozen encoder's mean patch token (cosine similarity, k = 20, T = 0.07; several
  k in one pass with `--knn_k 10 20 100`, the first is `eval_accuracy`). Each process keeps only its shard of the
  train split's features, on its device; the queries are scored against every shard.
- `linear`: DINOv2's linear probe: a grid of linear heads, `--probe_lrs` x `--linear_features` (mean patch token,
  CLS token, the last 4 blocks' mean tokens concatenated), trained together on one forward of the frozen encoder
  per batch, on RandomResizedCrop (`--crop_scale`) + flip; the Trainer's flags set the rest (`--num_train_epochs`,
  `--per_device_train_batch_size`, `--optim` (AdamW; `sgd --optim_args momentum=0.9` is DINOv2's), `--weight_decay`,
  `--lr_scheduler_type cosine`, `--warmup_steps`, `--max_grad_norm` (per head), `--bf16`; checkpoints and resume).
- `attentive`: AIM's attentive probe on the average of the last `--attentive_blocks` blocks' patch tokens, one head
  per `--probe_lrs` value, trained like the linear grid on timm's RandAugment (`--aa`) crops.

The probes report every head (`eval_<head>_accuracy`, `_top5`, `_loss`; the table in `output_dir/probe_heads.md`)
and the best head's top-1 as `eval_accuracy`, named in `eval_best_head` (chosen on the validation split, as
DINOv2 and AIM report). Every frozen protocol runs the encoder with causal attention (`--is_causal True`, the
default: as NEPA pretrains it) or bidirectional (`--is_causal False`). Metrics are printed and written to `output_dir/eval_results.json`. Runs
multi-GPU under torchrun like the training scripts; docs/recipes.md has the ImageNet recipes.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import set_seed

from models.vit_nepa import ViTNepaConfig, ViTNepaForImageClassification
from nepa.args import (
    DataArguments,
    NepaTrainingArguments,
    Use,
    configure_logging,
    crop_pct_field,
    option,
    parse_arguments,
    resize_size_field,
    unused,
)
from nepa.checkpoint import load_image_processor, load_model, local_folder
from nepa.data import (
    EvalTransform,
    FinetuneTransform,
    RAND_AUGMENT,
    RandomCropFlip,
    get_split,
    image_dataset,
    load_image_dataset,
    num_classes,
    processor_image_size,
    training_split,
)
from nepa.ema import EMA_WEIGHTS_NAME, ModelEMA
from nepa.metrics import accuracy_metrics, top5_and_nll
from nepa.probes import (
    ATTENTIVE_BLOCKS,
    ATTENTIVE_LRS,
    KNN_K,
    KNN_TEMPERATURE,
    LINEAR_FEATURES,
    LINEAR_LRS,
    ProbeGrid,
    ProbeTrainer,
    knn_evaluate,
    load_frozen_encoder,
)
from nepa.trainer import NepaTrainer, image_inputs, resume_checkpoint

logger = logging.getLogger("eval")
PROTOCOLS = ("finetuned", "knn", "linear", "attentive")


@dataclass
class EvalTrainingArguments(NepaTrainingArguments):
    """The probes' training defaults: DINOv2's linear-probe schedule (10 epochs, cosine, no clipping) at a per-device
    batch of 128 (1024 on 8 GPUs), with the Trainer's AdamW."""

    per_device_train_batch_size: int = option(128, "Images per device per probe step.")
    num_train_epochs: float = option(10.0, "Epochs of the probes (DINOv2: 10; AIMv2's attentive probe: 100).")
    lr_scheduler_type: str = option("cosine", "The probes' schedule; cosine ends at --probe_min_lr.")
    max_grad_norm: float = option(0.0, "Clip each probe head's gradient norm to this (0: none, DINOv2's).")
    use_ema: bool | None = option(
        None,
        "--protocol finetuned: evaluate the folder's EMA weights (model_ema.safetensors) beside the raw ones "
        "as eval_ema_* (default: when the folder has them; True: require them; False: the raw weights only).",
    )


@dataclass
class EvalArguments:
    model_name_or_path: str = option(
        help="A saved ViT-NEPA folder (a classifier, or any encoder for the frozen protocols)."
    )
    image_processor_name: str | None = option(None, "Default: --model_name_or_path.")
    protocol: str = option(
        "finetuned",
        "finetuned: the classifier's predictions. knn: weighted k-NN on frozen mean patch tokens, the train "
        "split's features sharded across processes. linear: a grid of linear heads (--probe_lrs x --linear_features) "
        "on frozen features of augmented images, trained under the Trainer. attentive: AIM's attentive probe (one "
        "learned query over the averaged tokens of --attentive_blocks), one head per --probe_lrs value.",
        choices=PROTOCOLS,
    )
    is_causal: bool | None = option(
        None,
        "Frozen protocols: run the encoder with causal attention (True, the default: as NEPA pretrains it) or "
        "bidirectional (False), whatever its config says. The finetuned protocol runs the classifier as configured.",
    )
    knn_k: list[int] = option(
        default_factory=lambda: [KNN_K],
        help="Neighbours of the k-NN protocol; several in one pass, the first is eval_accuracy.",
    )
    knn_temperature: float = option(KNN_TEMPERATURE, "Vote weight exp(cosine / T) of the k-NN protocol.")
    probe_lrs: list[float] | None = option(
        None,
        f"Learning rates of the probe heads (default: linear {list(LINEAR_LRS)}, attentive {list(ATTENTIVE_LRS)}).",
    )
    probe_min_lr: float = option(0.0, "Where --lr_scheduler_type cosine ends, for every head (AIMv2: 1e-5).")
    linear_features: list[str] = option(
        default_factory=lambda: list(LINEAR_FEATURES),
        help="Features of the linear heads: mean (patch tokens), cls, last4 (the last 4 blocks' mean tokens, concatenated).",
    )
    attentive_blocks: list[int] = option(
        default_factory=lambda: list(ATTENTIVE_BLOCKS),
        help="Tokens of the attentive probe: K (average of the last K blocks) or FIRST LAST (blocks FIRST..LAST, 1-based).",
    )
    aa: str | None = option(
        RAND_AUGMENT, "timm RandAugment policy of the attentive probe's training images ('' for none)."
    )
    crop_pct: float = crop_pct_field()
    resize_size: int | None = resize_size_field()


FROZEN = Use("is used only by the frozen protocols (--protocol knn / linear / attentive)", lambda a: a.protocol != "finetuned")
PROBES = Use("is used only by the trained probes (--protocol linear / attentive)", lambda a: a.protocol in ("linear", "attentive"))
# Where each flag of eval.py applies (nepa.args.parse_arguments refuses it elsewhere); the rest apply to every run.
FLAG_USES = {
    "is_causal": FROZEN,
    "labels_per_class": FROZEN,
    "max_train_samples": FROZEN,
    "knn_k": Use("is used only by --protocol knn", lambda a: a.protocol == "knn"),
    "knn_temperature": Use("is used only by --protocol knn", lambda a: a.protocol == "knn"),
    "linear_features": Use("is used only by --protocol linear", lambda a: a.protocol == "linear"),
    "attentive_blocks": Use("is used only by --protocol attentive", lambda a: a.protocol == "attentive"),
    "aa": Use("is the attentive probe's augmentation, used only by --protocol attentive", lambda a: a.protocol == "attentive"),
    "use_ema": Use("is used only by --protocol finetuned (the frozen encoder has no average)", lambda a: a.protocol == "finetuned"),
    "max_eval_samples": None,
    **dict.fromkeys(
        ("probe_lrs", "probe_min_lr", "crop_scale", "crop_ratio", "per_device_train_batch_size", "num_train_epochs",
         "lr_scheduler_type", "max_grad_norm", "warmup_ratio", "save_every_minutes", "skip_nonfinite_loss",
         "logging_nan_inf_filter"),
        PROBES,
    ),  # fmt: skip
    "learning_rate": unused("the probes train a grid of learning rates: give --probe_lrs"),
    "ema_decay": unused("eval.py averages no weights; --protocol finetuned evaluates the folder's saved EMA"),
}


def evaluate_classifier(args, trainer_kwargs, training_args) -> tuple[NepaTrainer, dict]:
    model = load_model(
        ViTNepaForImageClassification, args.model_name_or_path, "--model_name_or_path", "classifier",
        "fine-tune it first, or judge the encoder with --protocol knn / linear / attentive.",
    )  # fmt: skip
    ema_file = Path(args.model_name_or_path) / EMA_WEIGHTS_NAME
    if training_args.use_ema and not ema_file.is_file():
        raise FileNotFoundError(f"--use_ema True, but {args.model_name_or_path} has no {EMA_WEIGHTS_NAME}: leave the flag out.")
    trainer = NepaTrainer(
        model=model,
        args=training_args,
        compute_metrics=accuracy_metrics,
        preprocess_logits_for_metrics=top5_and_nll,
        **trainer_kwargs,
    )
    if training_args.use_ema is not False and ema_file.is_file():  # NepaTrainer builds none: nothing trains here
        trainer.ema = ModelEMA(trainer.model, decay=1.0)
        trainer.ema.load(str(ema_file))
    return trainer, trainer.evaluate()


def evaluate_knn(args, trainer_kwargs, training_args, train_dataset, classes) -> tuple[NepaTrainer, dict]:
    encoder = load_frozen_encoder(args.model_name_or_path, args.is_causal is not False)
    trainer = NepaTrainer(model=encoder, args=training_args, **trainer_kwargs)
    _, metrics = knn_evaluate(trainer, train_dataset, trainer_kwargs["eval_dataset"], classes, args.knn_k, args.knn_temperature)
    return trainer, metrics


def train_probes(args, trainer_kwargs, training_args, train_dataset, classes) -> tuple[ProbeTrainer, dict]:
    encoder = load_frozen_encoder(args.model_name_or_path, args.is_causal is not False)
    lrs = args.probe_lrs or (LINEAR_LRS if args.protocol == "linear" else ATTENTIVE_LRS)
    grid = ProbeGrid(encoder, args.protocol, classes, lrs, args.linear_features, args.attentive_blocks)
    trainer_kwargs = {**trainer_kwargs, "train_dataset": train_dataset}
    trainer = ProbeTrainer(model=grid, args=training_args, min_lr=args.probe_min_lr, **trainer_kwargs)
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    trainer.save_state()  # trainer_state.json: the loss curve
    metrics = trainer.evaluate()
    if training_args.should_save:
        trainer.write_table(metrics, Path(training_args.output_dir) / "probe_heads.md")
    return trainer, metrics


def main(argv: list[str] | None = None) -> dict:
    args, data_args, training_args = parse_arguments((EvalArguments, DataArguments, EvalTrainingArguments), argv, FLAG_USES)
    configure_logging(training_args)
    if args.probe_lrs is not None and not args.probe_lrs:
        raise ValueError("--probe_lrs needs at least one learning rate.")
    local_folder(args.model_name_or_path, "--model_name_or_path")

    set_seed(training_args.seed)  # the training images' augmentation seeds (ImageDataset) and the heads' initial weights
    processor = load_image_processor(args.image_processor_name, args.model_name_or_path)
    size = processor_image_size(processor, ViTNepaConfig.from_pretrained(args.model_name_or_path).patch_size)
    transform = EvalTransform(size, args.resize_size, args.crop_pct)
    dataset = load_image_dataset(data_args)
    eval_split = get_split(dataset, "validation", data_args.max_eval_samples, training_args.seed, data_args.label_column_name)
    trainer_kwargs = image_inputs(processor, eval_dataset=image_dataset(eval_split, transform, data_args))

    if args.protocol == "finetuned":
        trainer, metrics = evaluate_classifier(args, trainer_kwargs, training_args)
    else:
        train_split = training_split(dataset, data_args, training_args.seed)
        classes = num_classes(train_split, data_args.label_column_name)
        if args.protocol == "knn":
            train_transform, protocol = transform, evaluate_knn
        elif args.protocol == "linear":
            train_transform, protocol = RandomCropFlip(size, data_args.crop_scale, data_args.crop_ratio), train_probes
        else:
            train_transform = FinetuneTransform(size, args.aa, processor.image_mean, data_args.crop_scale, data_args.crop_ratio)
            protocol = train_probes
        train_dataset = image_dataset(train_split, train_transform, data_args)
        trainer, metrics = protocol(args, trainer_kwargs, training_args, train_dataset, classes)
    if args.protocol != "finetuned":
        metrics["eval_attention"] = "bidirectional" if args.is_causal is False else "causal"
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics, combined=False)
    return metrics


if __name__ == "__main__":
    main()
