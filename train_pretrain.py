"""NEPA pretraining: a causal ViT learns to predict the embedding of the next patch.

    python train_pretrain.py --config_name configs/pretrain/nepa-base-patch14-224 \
        --dataset_name data/imagenet-1k-hf --load_from_disk True --output_dir outputs/nepa-b ...
    python train_pretrain.py my_run.json      # the same arguments as a JSON file

Every `TrainingArguments` flag works. A run started again with the same command resumes from the
newest complete checkpoint in `output_dir`.

`--knn_eval_steps N` watches the encoder: every N steps and at the end, eval.py's k-NN protocol on
`--knn_train_samples` train and `--knn_eval_samples` validation images, logged as `eval_knn_top1`, `eval_knn_top5`
and `eval_rankme` (and `eval_ema_*` of the EMA), without changing the training in any way.
"""

import logging
from dataclasses import dataclass

from transformers import TrainerCallback, set_seed

from models.vit_nepa import ViTNepaForPreTraining
from nepa.args import TRAINING, DataArguments, NepaTrainingArguments, Use, config_overrides_field, configure_logging
from nepa.args import option, parse_arguments, unused
from nepa.checkpoint import load_config, load_image_processor, load_model
from nepa.data import (
    DEFAULT_CROP_PCT,
    EvalTransform,
    RandomCropFlip,
    get_split,
    image_dataset,
    load_image_dataset,
    processor_image_size,
)
from nepa.metrics import mean_pairwise_cosine
from nepa.optim import pretraining_param_groups
from nepa.probes import KNN_K, KNN_TEMPERATURE, KnnMonitor, knn_monitor
from nepa.trainer import NepaTrainer, image_inputs, resume_checkpoint, train_and_evaluate

logger = logging.getLogger("train_pretrain")


@dataclass
class ModelArguments:
    config_name: str | None = option(
        None, "A folder with config.json (and preprocessor_config.json) to start from scratch."
    )
    model_name_or_path: str | None = option(None, "A saved NEPA folder to continue from.")
    image_processor_name: str | None = option(
        None, "Folder of preprocessor_config.json; default: the config or model folder."
    )
    config_overrides: str | None = config_overrides_field()
    embed_lr: float | None = option(None, "A separate learning rate for the embeddings.")


@dataclass
class MonitorArguments:
    knn_eval_steps: int = option(
        0,
        "Every N optimiser steps and at the end, a k-NN of the current weights (eval.py --protocol knn: "
        f"k = {KNN_K}, T = {KNN_TEMPERATURE}, mean patch tokens) and RankMe of its features, logged as eval_knn_top1, "
        "eval_knn_top5, eval_rankme (eval_ema_* for the EMA); RankMe alone on a dataset without labels. 0: off.",
    )
    knn_train_samples: int = option(
        50_000, "Train images of the k-NN bank, picked as eval.py --max_train_samples picks them."
    )
    knn_eval_samples: int = option(
        10_000, "Validation images the k-NN scores, picked as eval.py --max_eval_samples picks them."
    )
    knn_crop_pct: float = option(DEFAULT_CROP_PCT, "The k-NN images' centre crop, as eval.py --crop_pct.")

    def __post_init__(self):
        if self.knn_eval_steps < 0:
            raise ValueError(f"--knn_eval_steps {self.knn_eval_steps}: give a number of steps, or 0 for no k-NN.")
        for name in ("knn_train_samples", "knn_eval_samples", "knn_crop_pct"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} {getattr(self, name)}: give a positive number.")


class MonitorSchedule(TrainerCallback):
    """Makes the Trainer evaluate every `steps` optimiser steps and after the last one (beside its --eval_strategy)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps == 0 or state.global_step >= state.max_steps:
            control.should_evaluate = True


MONITORING = Use("is used only with --knn_eval_steps N (the k-NN it sets is off without it)", lambda a: a.knn_eval_steps > 0)
# Where each flag of train_pretrain.py applies beyond nepa.args' shared table (parse_arguments refuses it elsewhere).
FLAG_USES = {
    "config_name": Use("is used only without --model_name_or_path, whose folder gives the config", lambda a: not a.model_name_or_path),
    "embed_lr": TRAINING,
    "labels_per_class": unused("it picks labelled images for fine-tuning; pretraining trains on every image"),
    "label_column_name": Use("is used only with --knn_eval_steps N: only its k-NN reads labels", lambda a: a.knn_eval_steps > 0),
    "knn_train_samples": MONITORING,
    "knn_eval_samples": MONITORING,
    "knn_crop_pct": MONITORING,
}


def build_model(model_args: ModelArguments) -> ViTNepaForPreTraining:
    if not (model_args.config_name or model_args.model_name_or_path):
        raise ValueError("pass --config_name (train from scratch) or --model_name_or_path (continue from weights).")
    flag = "--model_name_or_path" if model_args.model_name_or_path else "--config_name"
    source = model_args.model_name_or_path or model_args.config_name
    config = load_config(source, flag, model_args.config_overrides)
    if model_args.model_name_or_path:
        instead = "continue from a folder train_pretrain.py saved, or start from --config_name."
        return load_model(ViTNepaForPreTraining, source, flag, "pretraining", instead, config=config)
    return ViTNepaForPreTraining(config)


class NepaPretrainer(NepaTrainer):
    """Adds the embedding learning rate, logs the collapse signal (`target_cosine`) and, with a `KnnMonitor`,
    adds its k-NN and RankMe to every evaluation (which `monitor_steps` adds every so many steps)."""

    def __init__(self, *args, embed_lr: float | None = None, monitor: KnnMonitor | None = None, monitor_steps: int = 0, **kwargs):
        self.embed_lr = embed_lr
        self.monitor = monitor
        super().__init__(*args, **kwargs)
        if monitor is not None:
            self.add_callback(MonitorSchedule(monitor_steps))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The loss on the evaluation set (when there is one), then the monitor's metrics, logged (log_history,
        wandb, tensorboard) and returned together, so that `--metric_for_best_model knn_top1` finds them."""
        metrics = {}
        if self.monitor is None or eval_dataset is not None or self.eval_dataset is not None:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.monitor is not None:
            watched = self.monitor.evaluate(self, metric_key_prefix)
            self.log(dict(watched))
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, watched)
            metrics.update(watched)
        return metrics

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
    model_args, data_args, training_args, monitor_args = parse_arguments(
        (ModelArguments, DataArguments, NepaTrainingArguments, MonitorArguments), argv, FLAG_USES
    )
    configure_logging(training_args)
    set_seed(training_args.seed)

    # Everything that can be wrong with the arguments fails here, before any data is read.
    model = build_model(model_args)
    processor = load_image_processor(model_args.image_processor_name, model_args.model_name_or_path or model_args.config_name)
    size = processor_image_size(processor, model.config.patch_size)
    checkpoint = resume_checkpoint(training_args)

    dataset = load_image_dataset(data_args)
    train_split = get_split(dataset, "train", data_args.max_train_samples, training_args.seed, data_args.label_column_name)
    transform = RandomCropFlip(size, data_args.crop_scale, data_args.crop_ratio)
    train_dataset = image_dataset(train_split, transform, data_args, labels=False)
    eval_dataset = None
    if training_args.do_eval:
        eval_split = get_split(dataset, "validation", data_args.max_eval_samples, training_args.seed, data_args.label_column_name)
        eval_dataset = image_dataset(eval_split, EvalTransform(size), data_args, labels=False)
    monitor = None
    if monitor_args.knn_eval_steps:
        knn_transform = EvalTransform(size, crop_pct=monitor_args.knn_crop_pct)  # eval.py's
        train_samples, eval_samples = monitor_args.knn_train_samples, monitor_args.knn_eval_samples
        monitor = knn_monitor(dataset, data_args, train_samples, eval_samples, knn_transform, training_args.seed)
    logger.info("NEPA pretraining of %.1fM parameters on %d images", model.num_parameters() / 1e6, len(train_dataset))

    trainer = NepaPretrainer(
        model=model,
        args=training_args,
        **image_inputs(processor, train_dataset, eval_dataset),
        embed_lr=model_args.embed_lr,
        monitor=monitor,
        monitor_steps=monitor_args.knn_eval_steps,
    )
    return train_and_evaluate(trainer, processor, checkpoint, model_args.model_name_or_path)


if __name__ == "__main__":
    main()
