"""Evaluate a ViT-NEPA checkpoint on the validation split.

    python eval.py --model_name_or_path outputs/nepa-b-sft --dataset_name data/imagenet-1k-hf \
        --load_from_disk True --output_dir outputs/eval-nepa-b

`--protocol finetuned` (default) runs the classifier: `eval_accuracy` (top-1), `eval_top5`,
`eval_loss`, and the same with `eval_ema_` when the folder has EMA weights. `--protocol knn` and
`--protocol linear` judge any encoder (pretraining or classifier folder) on frozen features, the
mean of its patch tokens: weighted k-NN on cosine similarity, or a linear classifier trained on the
train split's features. Metrics are printed and written to `output_dir/eval_results.json`.
Runs multi-GPU under torchrun like the training scripts.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.vit_nepa import ViTNepaConfig, ViTNepaForImageClassification, ViTNepaModel
from models.vit_nepa.modeling_vit_nepa import mean_patch_tokens
from nepa.args import DataArguments, NepaTrainingArguments, configure_logging, crop_pct_field, parse_arguments, resize_size_field
from nepa.checkpoint import load_image_processor, load_model, local_folder
from nepa.data import (
    EvalTransform,
    get_split,
    image_dataset,
    load_image_dataset,
    num_classes,
    processor_image_size,
    training_split,
)
from nepa.ema import EMA_WEIGHTS_NAME
from nepa.metrics import accuracy_metrics, knn_predict, linear_probe_predict, scores_to_metrics, top5_indices
from nepa.trainer import NepaTrainer, image_inputs

logger = logging.getLogger("eval")
PROTOCOLS = ("finetuned", "knn", "linear")


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "A saved ViT-NEPA folder."})
    image_processor_name: str | None = field(default=None, metadata={"help": "Default: --model_name_or_path."})
    protocol: str = field(
        default="finetuned",
        metadata={"help": "The classifier's predictions, or k-NN / a linear probe on frozen features.", "choices": PROTOCOLS},
    )
    knn_k: int = field(default=20, metadata={"help": "Neighbours of the k-NN protocol."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Vote weight exp(cosine / T) of the k-NN protocol."})
    linear_epochs: int = field(default=100, metadata={"help": "Epochs of the linear protocol's classifier."})
    linear_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the linear protocol."})
    crop_pct: float = crop_pct_field()
    resize_size: int | None = resize_size_field()


class FeatureTrainer(NepaTrainer):
    """`predict()` returns (mean patch token, label) for every image, gathered across processes."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        hidden = self.forward_without_grad(model, inputs).last_hidden_state
        return None, mean_patch_tokens(hidden).float(), inputs["labels"]


def evaluate_classifier(args, trainer_kwargs, training_args) -> tuple[NepaTrainer, dict]:
    model = load_model(
        ViTNepaForImageClassification, args.model_name_or_path, "--model_name_or_path", "classifier",
        "fine-tune it first, or judge the encoder with --protocol knn / linear.",
    )  # fmt: skip
    ema_file = Path(args.model_name_or_path) / EMA_WEIGHTS_NAME
    training_args.use_ema = ema_file.is_file()
    trainer = NepaTrainer(
        model=model,
        args=training_args,
        compute_metrics=accuracy_metrics,
        preprocess_logits_for_metrics=top5_indices,
        **trainer_kwargs,
    )
    if trainer.ema is not None:
        trainer.ema.load(str(ema_file))
    return trainer, trainer.evaluate()


def evaluate_frozen_features(args, trainer_kwargs, training_args, train_dataset, num_classes) -> tuple[NepaTrainer, dict]:
    model = load_model(ViTNepaModel, args.model_name_or_path, "--model_name_or_path", "encoder", "pass a ViT-NEPA model folder.")
    training_args.use_ema = False  # the features come from the saved weights; an EMA copy would only cost memory
    trainer = FeatureTrainer(model=model, args=training_args, **trainer_kwargs)
    train = trainer.predict(train_dataset)
    query = trainer.predict(trainer_kwargs["eval_dataset"])
    train_features, train_labels = torch.from_numpy(train.predictions), torch.from_numpy(train.label_ids).long()
    query_features, query_labels = torch.from_numpy(query.predictions), torch.from_numpy(query.label_ids).long()
    if args.protocol == "knn":
        votes = knn_predict(train_features, train_labels, query_features, num_classes, args.knn_k, args.knn_temperature)
        scores = (votes / votes.sum(dim=1, keepdim=True)).clamp_min(1e-12).log()
    else:
        scores = linear_probe_predict(
            train_features, train_labels, query_features, num_classes, args.linear_epochs, args.linear_lr, seed=training_args.seed
        )
    return trainer, scores_to_metrics(scores, query_labels)


def main(argv: list[str] | None = None) -> dict:
    args, data_args, training_args = parse_arguments((EvalArguments, DataArguments, NepaTrainingArguments), argv)
    configure_logging(training_args)
    local_folder(args.model_name_or_path, "--model_name_or_path")

    processor = load_image_processor(args.image_processor_name, args.model_name_or_path)
    size = processor_image_size(processor, ViTNepaConfig.from_pretrained(args.model_name_or_path).patch_size)
    transform = EvalTransform(size, args.resize_size, args.crop_pct)
    dataset = load_image_dataset(data_args)
    eval_split = get_split(dataset, "validation", data_args.max_eval_samples, training_args.seed)
    trainer_kwargs = image_inputs(processor, eval_dataset=image_dataset(eval_split, transform, data_args))

    if args.protocol == "finetuned":
        trainer, metrics = evaluate_classifier(args, trainer_kwargs, training_args)
    else:
        train_split = training_split(dataset, data_args, training_args.seed)
        train_dataset = image_dataset(train_split, transform, data_args)
        classes = num_classes(train_split, data_args.label_column_name)
        trainer, metrics = evaluate_frozen_features(args, trainer_kwargs, training_args, train_dataset, classes)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics, combined=False)
    return metrics


if __name__ == "__main__":
    main()
