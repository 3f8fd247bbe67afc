"""NEPA pretraining: a causal ViT learns to predict the embedding of the next patch.

    python train_pretrain.py --config_name configs/pretrain/nepa-base-patch14-224 \
        --dataset_name data/imagenet-1k-hf --load_from_disk True --output_dir outputs/nepa-b ...
    python train_pretrain.py my_run.json      # the same arguments as a JSON file

Every `TrainingArguments` flag works. A run started again with the same command resumes from the
newest complete checkpoint in `output_dir`.
"""

import logging
from dataclasses import dataclass, field

from transformers import set_seed

from models.vit_nepa import ViTNepaForPreTraining
from nepa.args import TRAINING, DataArguments, NepaTrainingArguments, Use, config_overrides_field, configure_logging
from nepa.args import load_config, parse_arguments, unused
from nepa.checkpoint import load_image_processor, load_model, local_folder
from nepa.data import (
    EvalTransform,
    PretrainTransform,
    get_split,
    image_dataset,
    load_image_dataset,
    processor_image_size,
)
from nepa.metrics import mean_pairwise_cosine
from nepa.optim import pretraining_param_groups
from nepa.trainer import NepaTrainer, image_inputs, resume_checkpoint, train_and_evaluate

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
    config_overrides: str | None = config_overrides_field()
    embed_lr: float | None = field(default=None, metadata={"help": "A separate learning rate for the embeddings."})


# Where each flag of train_pretrain.py applies beyond nepa.args' shared table (parse_arguments refuses it elsewhere).
FLAG_USES = {
    "config_name": Use("is used only without --model_name_or_path, whose folder gives the config", lambda a: not a.model_name_or_path),
    "embed_lr": TRAINING,
    "labels_per_class": unused("it picks labelled images for fine-tuning; pretraining reads no labels"),
    "label_column_name": unused("pretraining reads no labels"),
}


def build_model(model_args: ModelArguments) -> ViTNepaForPreTraining:
    if not (model_args.config_name or model_args.model_name_or_path):
        raise ValueError("pass --config_name (train from scratch) or --model_name_or_path (continue from weights).")
    flag = "--model_name_or_path" if model_args.model_name_or_path else "--config_name"
    source = local_folder(model_args.model_name_or_path or model_args.config_name, flag)
    config = load_config(source, model_args.config_overrides)
    if model_args.model_name_or_path:
        instead = "continue from a folder train_pretrain.py saved, or start from --config_name."
        return load_model(ViTNepaForPreTraining, source, flag, "pretraining", instead, config=config)
    return ViTNepaForPreTraining(config)


class NepaPretrainer(NepaTrainer):
    """Adds the embedding learning rate and logs the collapse signal (`target_cosine`)."""

    def __init__(self, *args, embed_lr: float | None = None, **kwargs):
        self.embed_lr = embed_lr
        super().__init__(*args, **kwargs)

    def parameter_groups(self, model):
        return pretraining_param_groups(model, self.args.weight_decay, self.embed_lr)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self.prepare_batch(inputs)
        outputs = model(pixel_values=inputs["pixel_values"])
        if model.training:
            self.record("target_cosine", mean_pairwise_cosine(outputs.input_embeddings[:, 1:]))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return self.forward_without_grad(model, inputs).loss.detach(), None, None


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(
        (ModelArguments, DataArguments, NepaTrainingArguments), argv, FLAG_USES
    )
    configure_logging(training_args)
    set_seed(training_args.seed)

    # Everything that can be wrong with the arguments fails here, before any data is read.
    model = build_model(model_args)
    processor = load_image_processor(model_args.image_processor_name, model_args.model_name_or_path or model_args.config_name)
    size = processor_image_size(processor, model.config.patch_size)
    checkpoint = resume_checkpoint(training_args)

    dataset = load_image_dataset(data_args)
    train_split = get_split(dataset, "train", data_args.max_train_samples, training_args.seed)
    transform = PretrainTransform(size, data_args.crop_scale, data_args.crop_ratio)
    train_dataset = image_dataset(train_split, transform, data_args, labels=False)
    eval_dataset = None
    if training_args.do_eval:
        eval_split = get_split(dataset, "validation", data_args.max_eval_samples, training_args.seed)
        eval_dataset = image_dataset(eval_split, EvalTransform(size), data_args, labels=False)
    logger.info("NEPA pretraining of %.1fM parameters on %d images", model.num_parameters() / 1e6, len(train_dataset))

    trainer = NepaPretrainer(
        model=model,
        args=training_args,
        **image_inputs(processor, train_dataset, eval_dataset),
        embed_lr=model_args.embed_lr,
    )
    return train_and_evaluate(trainer, processor, checkpoint, model_args.model_name_or_path)


if __name__ == "__main__":
    main()
