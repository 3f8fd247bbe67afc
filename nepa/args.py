"""Command-line arguments shared by the entry points, parsed with `HfArgumentParser`.

Every `TrainingArguments` flag works beside these, and a single `.json` argument replaces the
whole command line (`python train_pretrain.py configs/my_run.json`)."""

import atexit
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import transformers
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from .data import DEFAULT_CROP_PCT, DEFAULT_CROP_RATIO, DEFAULT_CROP_SCALE


def option(default=MISSING, help: str = "", *, default_factory=MISSING, **metadata):
    """A dataclass field that `HfArgumentParser` makes a flag: its default (or `default_factory`; neither: required)
    and its `--help` text; `metadata` adds argparse's keywords (`choices=...`)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, **metadata})


@dataclass
class DataArguments:
    dataset_name: str | None = option(None, "A Hub dataset id, or a `save_to_disk` folder with --load_from_disk True.")
    load_from_disk: bool = option(False, "Read --dataset_name with datasets.load_from_disk.")
    train_dir: str | None = option(None, "An image folder (class subfolders) for training.")
    validation_dir: str | None = option(None, "An image folder for validation.")
    cache_dir: str | None = option(None, "Where datasets caches downloads.")
    image_column_name: str = option("image", "The column holding the images.")
    label_column_name: str = option("label", "The column holding the class labels.")
    max_train_samples: int | None = option(
        None, "Train on a subset of this size, drawn with --seed (class-balanced when labelled)."
    )
    max_eval_samples: int | None = option(
        None, "Evaluate on a subset of this size, drawn with --seed (class-balanced when labelled)."
    )
    labels_per_class: float | None = option(
        None,
        "Train on a class-balanced labelled subset: N images of each class, or (below 1) that fraction of "
        "each class, drawn with --seed (the same images for every model given the same seed).",
    )
    crop_scale: list[float] = option(
        default_factory=lambda: [*DEFAULT_CROP_SCALE],
        help="Training RandomResizedCrop: MIN MAX fraction of the image's area.",
    )
    crop_ratio: list[float] = option(
        default_factory=lambda: [*DEFAULT_CROP_RATIO], help="Training RandomResizedCrop: MIN MAX aspect ratio."
    )
    strict_images: bool = option(False, "Stop at the first undecodable image instead of skipping and logging it.")
    images_in_memory: bool = option(
        False,
        "Small datasets: decode each split once into one uint8 tensor and crop and flip whole batches "
        "(the same crops and resampling); no dataloader workers needed. Refuses RandAugment (--aa). See docs/usage.md.",
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


def config_overrides_field():
    """The `--config_overrides` field of an entry point's model arguments."""
    return option(
        None, "Comma-separated key=value config changes (JSON values), e.g. 'nepa_shift=false,qk_norm=false'."
    )


def crop_pct_field():
    """The `--crop_pct` field of an entry point that evaluates on centre crops."""
    return option(DEFAULT_CROP_PCT, "Evaluation: resize the shorter side to size / crop_pct, centre-crop.")


def resize_size_field():
    """The `--resize_size` field beside `--crop_pct`."""
    return option(None, "Evaluation: resize the shorter side to this instead (overrides crop_pct).")


@dataclass(frozen=True)
class Use:
    """Where a flag is used: the runs whose parsed arguments satisfy `when`; `where` says it in a refusal, as
    `--flag <where>` ("is used only with --do_train")."""

    where: str
    when: Callable[[SimpleNamespace], bool]


def unused(reason: str) -> Use:
    """A flag no run of the entry point uses (it exists for another one, or keeps a Trainer default)."""
    return Use(f"is not used: {reason}", lambda arguments: False)


# Flags each entry point takes, and where they apply. An entry point's table `{flag: Use}` adds its own to these and
# overrides them (`None`: every run uses it); a flag absent from the tables is used by every run of the entry point.
# `refuse_unused_flags` enforces them.
TRAINING = Use("is used only with --do_train", lambda arguments: arguments.do_train)
EVALUATING = Use("is used only with --do_eval (or an --eval_strategy)", lambda arguments: arguments.do_eval)
TRAINING_FLAG_USES = {
    "remove_unused_columns": unused("it stays False: batches carry labels that an encoder's forward does not take"),
    "warmup_ratio": TRAINING,
    "ema_decay": TRAINING,
    "save_every_minutes": TRAINING,
    "skip_nonfinite_loss": TRAINING,
    "logging_nan_inf_filter": TRAINING,
}
NAMED_DATASET = Use(
    "is used only without --train_dir / --validation_dir, which replace it", lambda a: not (a.train_dir or a.validation_dir)
)
DATA_FLAG_USES = {
    "dataset_name": NAMED_DATASET,
    "load_from_disk": NAMED_DATASET,
    "cache_dir": Use("is used only when reading from the Hub or image folders, not with --load_from_disk True", lambda a: not a.load_from_disk),
    "max_train_samples": TRAINING,
    "labels_per_class": TRAINING,
    "crop_scale": TRAINING,
    "crop_ratio": TRAINING,
    "max_eval_samples": EVALUATING,
}


def field_default(spec):
    if spec.default is not MISSING:
        return spec.default
    return spec.default_factory() if spec.default_factory is not MISSING else MISSING


def refuse_unused_flags(uses: dict[str, Use | None], values: dict, defaults: dict) -> None:
    """Raise `ValueError` for the first flag of `uses` that was given (its value is not its default) in a run that
    does not use it. `values` and `defaults` map every flag of the entry point (without `--`) to its parsed value
    and its default; the `Use` conditions read the parsed values."""
    arguments = SimpleNamespace(**values)
    for flag, use in uses.items():
        if use is not None and values[flag] != defaults[flag] and not use.when(arguments):
            raise ValueError(f"--{flag} {use.where}: leave it out, this run would ignore it.")


def parse_flags(parser, argv: list[str] | None, uses: dict[str, Use | None]):
    """`parser.parse_args(argv)` of an argparse entry point, whose flags apply as its table `uses` says: a flag
    given to a run that would not use it ends the parse with the refusal (argparse's usage error)."""
    arguments = parser.parse_args(argv)
    values = vars(arguments)
    try:
        refuse_unused_flags(uses, values, {name: parser.get_default(name) for name in values})
    except ValueError as error:
        parser.error(str(error))
    return arguments


def parse_arguments(dataclass_types: tuple, argv: list[str] | None = None, uses: dict[str, Use | None] | None = None) -> tuple:
    """Parse `argv` (default: sys.argv[1:]); a lone `*.json` argument is read as the arguments instead. With `uses`
    (an entry point's table of where its flags apply, added to `DATA_FLAG_USES` and `TRAINING_FLAG_USES` for
    the fields it has), a flag given to a run that would not use it is refused."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(dataclass_types)
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=str(Path(argv[0]).resolve()))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    if uses is not None:
        values = {spec.name: getattr(arguments, spec.name) for arguments in parsed for spec in fields(arguments) if spec.init}
        defaults = {spec.name: field_default(spec) for arguments in parsed for spec in fields(arguments) if spec.init}
        shared = {flag: use for flag, use in {**DATA_FLAG_USES, **TRAINING_FLAG_USES}.items() if flag in values}
        refuse_unused_flags({**shared, **uses}, values, defaults)
    return parsed


@dataclass
class NepaTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus what `NepaTrainer` adds, and `--warmup_ratio`, which the original release's
    commands pass and Transformers 5 replaced by a fractional `--warmup_steps`."""

    remove_unused_columns: bool = option(
        False, "Kept False: batches carry labels that an encoder's forward does not take."
    )
    warmup_ratio: float | None = option(
        None, "Warm up over this fraction of the training steps: the same as --warmup_steps with a value below 1."
    )

    use_ema: bool = option(True, "Keep an EMA of the weights, evaluate and save it too (the release's default).")
    ema_decay: float = option(0.9999, "EMA decay per optimiser step.")
    save_every_minutes: float | None = option(
        None,
        "Also save a checkpoint when this many minutes have passed since the last one (--save_total_limit "
        "keeps the newest complete ones), so a run stopped without warning loses at most that long.",
    )
    skip_nonfinite_loss: bool = option(False, "Drop a step whose loss is NaN/inf instead of stopping the run.")
    logging_nan_inf_filter: bool = option(
        False,
        "Off: NepaTrainer stops on (or, with --skip_nonfinite_loss, drops) a step with a NaN/inf loss, "
        "checked on the device; the Trainer's filter would make the CPU wait for the GPU every micro-step to hide "
        "such losses from the log.",
    )

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if self.warmup_steps:
                raise ValueError(
                    f"--warmup_ratio {self.warmup_ratio} and --warmup_steps {self.warmup_steps} both set the warm-up: "
                    f"pass one of them (--warmup_steps below 1 is a ratio too)."
                )
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio {self.warmup_ratio} is not a fraction in [0, 1) of the training steps.")
            self.warmup_steps = self.warmup_ratio
        if self.data_seed is None:
            # accelerate's sampler would seed itself from torch's initial seed, which NepaTrainer makes differ per
            # process; every process must draw the same permutation to take its own slice of it.
            self.data_seed = self.seed
        if self.save_every_minutes is not None and not self.save_every_minutes > 0:
            raise ValueError(f"--save_every_minutes {self.save_every_minutes}: give a positive number of minutes.")
        if self.use_ema:
            refuse_sharding_with_ema(self)
        super().__post_init__()


def release_process_group() -> None:
    """Destroy this process's process group before the interpreter exits. Left to the interpreter's own teardown,
    gloo's threads can still be running when their objects are destroyed, which aborts the process ("terminate
    called without an active exception", exit -6) after its work is done, and the launcher reports a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


atexit.register(release_process_group)  # every entry point reads its flags through this module


# accelerate's variables for a config file that enables sharding (`accelerate launch --config_file ...` sets them).
SHARDING_VARIABLES = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM")


def refuse_sharding_with_ema(args: TrainingArguments) -> None:
    """`ModelEMA` averages every process's whole copy of the weights; FSDP, DeepSpeed (it also casts the model to
    bf16 and keeps fp32 weights in its optimiser) and Megatron-LM hold shards or copies it cannot follow, so the
    average would be of the wrong tensors. Refuse them, however they are switched on."""
    enabled = [f"--{name}" for name in ("fsdp", "deepspeed") if getattr(args, name)]
    truthy = ("y", "yes", "t", "true", "on", "1")  # what accelerate's own flag parsing reads as true
    enabled += [f"{name}={os.environ[name]}" for name in SHARDING_VARIABLES if os.environ.get(name, "").lower() in truthy]
    if args.parallelism_config is not None:
        enabled.append("--parallelism_config")
    if enabled:
        raise ValueError(
            f"{' and '.join(enabled)} with --use_ema True (the default) is not supported: the EMA averages each "
            f"process's whole copy of the weights and cannot follow sharded ones. Train with DDP (plain torchrun, an "
            f"accelerate config without FSDP or DeepSpeed) to keep the EMA. Pass --use_ema False to shard."
        )


def add_bool_argument(parser, name: str, help: str) -> None:
    """An argparse boolean spelt as the `HfArgumentParser` entry points spell theirs: `--name True` / `--name False`
    (default False); a bare `--name` still means True."""
    parser.add_argument(name, type=string_to_bool, nargs="?", const=True, default=False, metavar="{True,False}", help=help)


def configure_logging(training_args: TrainingArguments) -> None:
    """Python and Transformers logging at the Trainer's per-process level (quiet on non-main ranks)."""
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)
