"""Command-line arguments shared by the entry points, parsed with `HfArgumentParser`.

Every `TrainingArguments` flag works beside these, and a single `.json` argument replaces the
whole command line (`python train_pretrain.py configs/my_run.json`)."""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser, TrainingArguments


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset id, or a `save_to_disk` folder with --load_from_disk True."}
    )
    load_from_disk: bool = field(default=False, metadata={"help": "Read --dataset_name with datasets.load_from_disk."})
    train_dir: str | None = field(default=None, metadata={"help": "An image folder (class subfolders) for training."})
    validation_dir: str | None = field(default=None, metadata={"help": "An image folder for validation."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets caches downloads."})
    image_column_name: str = field(default="image", metadata={"help": "The column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The column holding the class labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a random subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a random subset of this size."})
    labels_per_class: float | None = field(
        default=None,
        metadata={
            "help": "Train on a class-balanced labelled subset: N images of each class, or (below 1) that fraction of "
            "each class, drawn with --seed (the same images for every model given the same seed)."
        },
    )
    crop_scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0],
        metadata={"help": "Training RandomResizedCrop: MIN MAX fraction of the image's area."},
    )
    crop_ratio: list[float] = field(
        default_factory=lambda: [3 / 4, 4 / 3],
        metadata={"help": "Training RandomResizedCrop: MIN MAX aspect ratio."},
    )
    strict_images: bool = field(
        default=False, metadata={"help": "Stop at the first undecodable image instead of skipping and logging it."}
    )

    def __post_init__(self):
        for name in ("crop_scale", "crop_ratio"):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"--{name} takes two numbers, MIN MAX; got {getattr(self, name)}.")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"--crop_scale {low} {high}: need 0 < MIN <= MAX <= 1 (fractions of the image's area).")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise ValueError(f"--crop_ratio {low} {high}: need 0 < MIN <= MAX (width / height).")
        if self.labels_per_class is not None:
            if self.labels_per_class <= 0 or (self.labels_per_class > 1 and not float(self.labels_per_class).is_integer()):
                raise ValueError(
                    f"--labels_per_class {self.labels_per_class}: give a whole number of images per class, "
                    f"or a fraction of each class between 0 and 1."
                )
            if self.max_train_samples is not None:
                raise ValueError("--labels_per_class and --max_train_samples both pick training images: pass one.")


def parse_arguments(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse `argv` (default: sys.argv[1:]); a lone `*.json` argument is read as the arguments instead."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(dataclass_types)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=str(Path(argv[0]).resolve()))
    return parser.parse_args_into_dataclasses(args=argv)


@dataclass
class NepaTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus what `NepaTrainer` adds."""

    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: batches carry labels that an encoder's forward does not take."}
    )

    use_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the weights, evaluate and save it too."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per optimiser step."})
    skip_nonfinite_loss: bool = field(
        default=False, metadata={"help": "Drop a step whose loss is NaN/inf instead of stopping the run."}
    )


def configure_logging(training_args: TrainingArguments) -> None:
    """Python and Transformers logging at the Trainer's per-process level (quiet on non-main ranks)."""
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)
