"""NEPA pretraining: a causal ViT learns to predict the embedding of the next patch.

    python train_pretrain.py --config_name configs/pretrain/nepa-base-patch14-224 \
        --dataset_name data/imagenet-1k-hf --load_from_disk True --output_dir outputs/nepa-b ...
    python train_pretrain.py my_run.json      # the same arguments as a JSON file

Every `TrainingArguments` flag works. A run started again with the same command resumes from the
newest complete checkpoint in `output_dir`.
"""

import json
import logging
from dataclasses import dataclass, field

import torch
from transformers import AutoImageProcessor, set_seed

from models.vit_nepa import ViTNepaConfig, ViTNepaForPreTraining
from nepa.args import DataArguments, NepaTrainingArguments, configure_logging, parse_arguments
from nepa.data import (
    BatchNormalize,
    EvalTransform,
    ImageDataset,
    PretrainTransform,
    collate_images,
    get_split,
    load_image_dataset,
    processor_image_size,
)
from nepa.metrics import mean_pairwise_cosine
from nepa.optim import pretraining_param_groups
from nepa.trainer import NepaTrainer, resume_checkpoint, train_and_evaluate

logger = logging.getLogger("train_pretrain")


@dataclass
class ModelArguments:
    config_name: str | None = field(
        default=None, metadata={"help": "A folder with config.json (and preprocessor_config.json) to start from scratch."}
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved NEPA folder to continue from."})
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Folder of preprocessor_config.json; default: the config or model folder."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated key=value config changes (JSON values), e.g. 'nepa_shift=false,qk_norm=false'."},
    )
    embed_lr: float | None = field(default=None, metadata={"help": "A separate learning rate for the embeddings."})


def parse_config_overrides(text: str | None) -> dict:
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config_overrides item {item!r} is not key=value.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def build_model(model_args: ModelArguments) -> ViTNepaForPreTraining:
    if not (model_args.config_name or model_args.model_name_or_path):
        raise ValueError("pass --config_name (train from scratch) or --model_name_or_path (continue from weights).")
    source = model_args.model_name_or_path or model_args.config_name
    config = ViTNepaConfig.from_pretrained(source)
    for key, value in parse_config_overrides(model_args.config_overrides).items():
        if not hasattr(config, key):
            raise ValueError(f"--config_overrides: ViTNepaConfig has no field {key!r}.")
        setattr(config, key, value)
    config.check_geometry()
    if model_args.model_name_or_path:
        return ViTNepaForPreTraining.from_pretrained(model_args.model_name_or_path, config=config)
    return ViTNepaForPreTraining(config)


class NepaPretrainer(NepaTrainer):
    """Adds the embedding learning rate and logs the collapse signal (`target_cosine`)."""

    def __init__(self, *args, embed_lr: float | None = None, **kwargs):
        self.embed_lr = embed_lr
        super().__init__(*args, **kwargs)

    def parameter_groups(self, model):
        return pretraining_param_groups(model, self.args.weight_decay, self.embed_lr)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(pixel_values=inputs["pixel_values"])
        if model.training:
            self.record("target_cosine", mean_pairwise_cosine(outputs.input_embeddings[:, 1:]))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments((ModelArguments, DataArguments, NepaTrainingArguments), argv)
    configure_logging(training_args)
    set_seed(training_args.seed)

    # Everything that can be wrong with the arguments fails here, before any data is read.
    if data_args.labels_per_class is not None:
        raise ValueError("--labels_per_class picks labelled images for fine-tuning; pretraining uses no labels.")
    model = build_model(model_args)
    processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path or model_args.config_name
    )
    size = processor_image_size(processor, model.config.patch_size)
    checkpoint = resume_checkpoint(training_args)

    dataset = load_image_dataset(data_args)
    columns = dict(image_column=data_args.image_column_name, label_column=None, strict=data_args.strict_images)
    transform = PretrainTransform(size, data_args.crop_scale, data_args.crop_ratio)
    train_dataset = ImageDataset(get_split(dataset, "train", data_args.max_train_samples, training_args.seed), transform, **columns)
    eval_dataset = None
    if training_args.do_eval:
        eval_dataset = ImageDataset(
            get_split(dataset, "validation", data_args.max_eval_samples, training_args.seed), EvalTransform(size), **columns
        )
    logger.info("NEPA pretraining of %.1fM parameters on %d images", model.num_parameters() / 1e6, len(train_dataset))

    trainer = NepaPretrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_images,
        normalize=BatchNormalize(processor.image_mean, processor.image_std),
        embed_lr=model_args.embed_lr,
    )
    return train_and_evaluate(trainer, processor, checkpoint)


if __name__ == "__main__":
    main()
