"""Semantic segmentation with a ViT-NEPA backbone under UperNet (transformers' `UperNetForSemanticSegmentation`).

    python train_segmentation.py --model_name_or_path outputs/nepa-b \
        --dataset_name data/ade20k-hf --load_from_disk True --output_dir outputs/nepa-b-ade20k \
        --do_train --do_eval --max_steps 160000 ...
    python train_segmentation.py --model_name_or_path outputs/nepa-b-ade20k \
        --dataset_name data/ade20k-hf --load_from_disk True --output_dir outputs/eval-ade20k --do_eval

`--model_name_or_path` is a NEPA pretraining or classification folder (its encoder initialises the backbone;
the neck and the heads start at random), or a segmentation folder this script saved (to evaluate it with
`--do_eval` alone, or to train on). The dataset is one `download_dataset.py` builds for segmentation (masks
in `label`, 255 ignored, `id2label.json`). Training: the MAE/BEiT pipeline of `nepa.segmentation` on
`crop_size` crops, layer-wise lr decay. Evaluation: single-scale sliding windows, mIoU / pixel accuracy /
per-class IoU from one confusion matrix over the split. Every `TrainingArguments` flag works (bf16,
torchrun, ...); a run started again with the same command resumes from its newest complete checkpoint.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, UperNetConfig, UperNetForSemanticSegmentation, set_seed

from models.vit_nepa import ViTNepaBackbone
from nepa.args import EVALUATING, TRAINING, DataArguments, NepaTrainingArguments, Use, configure_logging, option, parse_arguments
from nepa.args import unused
from nepa.checkpoint import load_image_processor, load_model, local_folder
from nepa.data import get_split, image_dataset, load_image_dataset
from nepa.segmentation import (
    IGNORE_INDEX,
    SegmentationDataset,
    SegmentationEvalTransform,
    SegmentationTrainer,
    SegmentationTrainTransform,
    collate_segmentation,
    read_id2label,
)
from nepa.trainer import image_inputs, resume_checkpoint, train_and_evaluate

logger = logging.getLogger("train_segmentation")


@dataclass
class SegmentationTrainingArguments(NepaTrainingArguments):
    use_ema: bool = option(False, "Keep an EMA of the weights (off: the MAE/BEiT ADE20K recipe keeps none).")


@dataclass
class SegmentationArguments:
    model_name_or_path: str = option(
        help="A NEPA pretraining / classification folder, or a segmentation folder this script saved."
    )
    image_processor_name: str | None = option(None, "Default: --model_name_or_path.")
    # The architecture flags build a model from an encoder folder (defaults in ENCODER_DEFAULTS); a saved
    # segmentation folder fixes its own, and they are refused with it.
    out_indices: list[int] | None = option(
        None, "Blocks (1-based) feeding the pyramid; default 4 6 8 12 (B), 8 12 16 24 (L)."
    )
    is_causal: bool | None = option(None, "Keep causal attention (default False: bidirectional).")
    drop_path: float | None = option(None, "Stochastic depth of the last block (default 0.1).")
    llrd: float = option(0.65, "Layer-wise lr decay over the encoder blocks (1 = none).")
    decoder_hidden_size: int | None = option(None, "UperNet channels (default 512).")
    auxiliary_channels: int | None = option(None, "Channels of the auxiliary FCN head (default 256).")
    auxiliary_loss_weight: float | None = option(None, "Weight of the auxiliary head's loss (default 0.4).")
    # 504 = 36 x 14, not mmsegmentation's 512: a multiple of the patch size 14, the closest below 512 (518 costs 6 %
    # more tokens), whose even 36 x 36 grid makes the neck's half-resolution level exact; windows stride two thirds.
    crop_size: int = option(504, "Training crop and evaluation window (a multiple of the patch size).")
    train_scale: list[int] = option(default_factory=lambda: [2048, 512], help="Base scale of the random resize.")
    ratio_range: list[float] = option(default_factory=lambda: [0.5, 2.0], help="Random resize ratios.")
    cat_max_ratio: float = option(0.75, "Redraw crops where one class covers this much.")
    photometric: bool = option(True, "Photometric distortion in training.")
    eval_scale: list[int] = option(default_factory=lambda: [2048, 512], help="Keep-ratio resize for evaluation.")
    eval_stride: int = option(336, "Stride of the evaluation's sliding windows.")


# Fewer images than this in a BatchNorm's batch get a warning at start-up.
MIN_BATCHNORM_IMAGES = 4

# What the architecture flags default to when a model is built from an encoder folder.
ENCODER_DEFAULTS = dict(is_causal=False, drop_path=0.1, decoder_hidden_size=512, auxiliary_channels=256, auxiliary_loss_weight=0.4)


def folder_model_type(path: str) -> str | None:
    """The model_type of a local folder's config.json (None without one: the loader reports that)."""
    config_file = Path(path, "config.json")
    return json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None


CROPS_INSTEAD = "segmentation crops mmsegmentation's way: --train_scale, --ratio_range, --crop_size, --cat_max_ratio"
FROM_ENCODER = Use(
    "is used only when building the model from an encoder folder (a saved segmentation folder's config fixes it)",
    lambda a: folder_model_type(a.model_name_or_path) != "upernet",
)
# Where each flag of train_segmentation.py applies beyond nepa.args' shared table (parse_arguments refuses it elsewhere).
FLAG_USES = {
    **dict.fromkeys(("out_indices", *ENCODER_DEFAULTS), FROM_ENCODER),
    **dict.fromkeys(("llrd", "train_scale", "ratio_range", "cat_max_ratio", "photometric"), TRAINING),
    "eval_scale": EVALUATING,
    "eval_stride": EVALUATING,
    "labels_per_class": unused("segmentation trains on the whole training split (or --max_train_samples images of it)"),
    "crop_scale": unused(CROPS_INSTEAD),
    "crop_ratio": unused(CROPS_INSTEAD),
    "images_in_memory": unused("segmentation's masks and multi-scale crops have no in-memory path"),
}


def encoder_architecture(args: SegmentationArguments) -> SimpleNamespace:
    """The architecture flags built from an encoder folder: those given, else `ENCODER_DEFAULTS`."""
    given = {name: getattr(args, name) for name in ENCODER_DEFAULTS if getattr(args, name) is not None}
    return SimpleNamespace(**{**ENCODER_DEFAULTS, **given})


def build_model(args: SegmentationArguments, model_type: str, id2label: dict[int, str] | None) -> UperNetForSemanticSegmentation:
    flag = "--model_name_or_path"
    if model_type == "upernet":
        model = load_model(UperNetForSemanticSegmentation, args.model_name_or_path, flag, "segmentation", "save it again.")
        if id2label is not None and len(id2label) != model.config.num_labels:
            raise ValueError(
                f"{args.model_name_or_path} predicts {model.config.num_labels} classes but the dataset has {len(id2label)}."
            )
        return model
    if model_type != "vit_nepa":
        raise ValueError(f"{args.model_name_or_path} holds a {model_type!r} model; expected a NEPA or UperNet folder.")
    if id2label is None:
        raise ValueError(
            "the dataset folder has no id2label.json, so the number of classes is unknown: build the dataset with "
            "download_dataset.py (--dataset ade20k or fashion-mnist-seg)."
        )
    architecture = encoder_architecture(args)
    overrides = dict(is_causal=architecture.is_causal, drop_path_prob=architecture.drop_path)
    if args.out_indices is not None:
        overrides["out_indices"] = args.out_indices
    instead = "it is not a NEPA encoder checkpoint."
    backbone = load_model(ViTNepaBackbone, args.model_name_or_path, flag, "encoder", instead, optional=("neck.",), **overrides)
    config = UperNetConfig(
        backbone_config=backbone.config,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
        hidden_size=architecture.decoder_hidden_size,
        auxiliary_channels=architecture.auxiliary_channels,
        auxiliary_loss_weight=architecture.auxiliary_loss_weight,
        loss_ignore_index=IGNORE_INDEX,
    )
    model = UperNetForSemanticSegmentation(config)
    model.backbone = backbone  # the pretrained encoder (and a fresh neck) in place of the random one
    return model


def main(argv: list[str] | None = None) -> dict:
    args, data_args, training_args = parse_arguments(
        (SegmentationArguments, DataArguments, SegmentationTrainingArguments), argv, FLAG_USES
    )
    configure_logging(training_args)
    set_seed(training_args.seed)

    # Everything that can be wrong with the arguments fails here, before the images are read.
    model_type = AutoConfig.from_pretrained(local_folder(args.model_name_or_path, "--model_name_or_path")).model_type
    if not training_args.do_train and model_type != "upernet":
        raise ValueError(f"{args.model_name_or_path} is an encoder, not a segmentation model: evaluate it after --do_train.")
    id2label = read_id2label(data_args.dataset_name) if data_args.load_from_disk else None
    model = build_model(args, model_type, id2label)
    patch_size = model.config.backbone_config.patch_size
    if args.crop_size % patch_size:
        below, above = args.crop_size // patch_size * patch_size, (args.crop_size // patch_size + 1) * patch_size
        raise ValueError(
            f"--crop_size {args.crop_size} is not a multiple of patch_size {patch_size}: use {below} or {above}."
        )
    if training_args.do_eval and not 1 <= args.eval_stride <= args.crop_size:
        raise ValueError(f"--eval_stride {args.eval_stride} must lie in 1..crop_size ({args.crop_size}).")
    if training_args.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over all GPUs, as MAE/BEiT did
    batchnorm_images = training_args.per_device_train_batch_size * training_args.world_size
    if training_args.do_train and batchnorm_images < MIN_BATCHNORM_IMAGES:
        logger.warning(
            "BatchNorm in the UperNet heads normalises over %d images (--per_device_train_batch_size %d x %d processes; "
            "gradient accumulation does not add to it), so its statistics are noisy; the MAE/BEiT recipe's is 16, "
            "2 on each of 8 GPUs. Use more GPUs or a larger --per_device_train_batch_size to reach %d or more.",
            batchnorm_images, training_args.per_device_train_batch_size, training_args.world_size, MIN_BATCHNORM_IMAGES,
        )
    processor = load_image_processor(args.image_processor_name, args.model_name_or_path)
    checkpoint = resume_checkpoint(training_args)

    dataset = load_image_dataset(data_args)
    train_dataset = eval_dataset = None
    if training_args.do_train:
        transform = SegmentationTrainTransform(
            args.train_scale, args.ratio_range, args.crop_size, processor.image_mean, args.cat_max_ratio, args.photometric
        )
        train_split = get_split(dataset, "train", data_args.max_train_samples, training_args.seed)
        train_dataset = image_dataset(train_split, transform, data_args, dataset_class=SegmentationDataset)
    if training_args.do_eval:
        eval_split = get_split(dataset, "validation", data_args.max_eval_samples, training_args.seed)
        eval_dataset = image_dataset(eval_split, SegmentationEvalTransform(args.eval_scale), data_args, dataset_class=SegmentationDataset)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    logger.info("UperNet with a %.1fM-parameter ViT-NEPA backbone, %.1fM parameters in all", backbone / 1e6, model.num_parameters() / 1e6)

    trainer = SegmentationTrainer(
        model=model,
        args=training_args,
        **image_inputs(processor, train_dataset, eval_dataset, collate_segmentation),
        layer_decay=args.llrd,
        crop_size=args.crop_size,
        eval_stride=args.eval_stride,
    )
    return train_and_evaluate(trainer, processor, checkpoint, args.model_name_or_path)


if __name__ == "__main__":
    main()
