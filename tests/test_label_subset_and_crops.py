"""The semi-supervised protocol's pieces: the class-balanced labelled subset (`--labels_per_class`) and the
crop flags (`--crop_scale`, `--crop_ratio`) that every training entry point hands to its transform."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value
from helpers import COMMON, build_image_dataset, write_config_folder
from PIL import Image as PILImage

import init_nepa_cls_from_pretrain
import train_finetune
import train_pretrain
from models.vit_nepa import ViTNepaConfig, ViTNepaForPreTraining
from nepa.args import DataArguments, parse_arguments
from nepa.data import FinetuneTransform, RandomCropFlip, labelled_subset


def unbalanced_split() -> Dataset:
    """Labels only: 3 classes of 50, 80 and 120 rows, interleaved."""
    labels = [0] * 50 + [1] * 80 + [2] * 120
    np.random.default_rng(1).shuffle(labels)
    features = Features({"id": Value("int64"), "label": ClassLabel(names=["a", "b", "c"])})
    return Dataset.from_dict({"id": list(range(len(labels))), "label": labels}, features=features)


def class_counts(split: Dataset) -> list[int]:
    return np.bincount(split["label"], minlength=3).tolist()


def test_labelled_subset_is_class_balanced_and_seeded():
    split = unbalanced_split()
    subset = labelled_subset(split, 10, seed=0)
    assert class_counts(subset) == [10, 10, 10]
    assert len(set(subset["id"])) == 30
    assert subset["id"] == labelled_subset(split, 10, seed=0)["id"]  # same seed, same images
    assert subset["id"] != labelled_subset(split, 10, seed=1)["id"]
    # A fraction takes that share of each class.
    assert class_counts(labelled_subset(split, 0.1, seed=0)) == [5, 8, 12]


def test_labelled_subset_refuses_more_images_than_a_class_has():
    with pytest.raises(ValueError, match=r"asks for 60 images of class 0, which has 50"):
        labelled_subset(unbalanced_split(), 60, seed=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--crop_scale", "0.5"], r"--crop_scale takes two numbers"),
        (["--crop_scale", "0.5", "1.5"], r"0 < MIN <= MAX <= 1"),
        (["--crop_ratio", "2", "1"], r"0 < MIN <= MAX"),
        (["--labels_per_class", "2.5"], r"whole number of images per class"),
        (["--labels_per_class", "10", "--max_train_samples", "100"], r"pass one"),
    ],
)
def test_bad_data_arguments_are_refused_by_name(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_arguments((DataArguments,), argv)


def test_crop_flags_parse_into_the_data_arguments():
    (data_args,) = parse_arguments((DataArguments,), ["--crop_scale", "0.5", "1", "--crop_ratio", "0.9", "1.1"])
    assert data_args.crop_scale == [0.5, 1.0] and data_args.crop_ratio == [0.9, 1.1]
    (defaults,) = parse_arguments((DataArguments,), [])
    assert defaults.crop_scale == [0.08, 1.0] and defaults.crop_ratio == pytest.approx([3 / 4, 4 / 3])


@pytest.mark.parametrize(
    "make", [lambda scale, ratio: RandomCropFlip(16, scale, ratio), lambda scale, ratio: FinetuneTransform(16, None, (0.5,) * 3, scale, ratio)]
)
def test_a_whole_image_crop_keeps_every_pixel(make):
    """scale (1, 1) and ratio (1, 1) of a square image is the image itself (or its mirror); the default crop is not."""
    pixels = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    record = {"bytes": _png(pixels), "path": None}
    whole = make((1.0, 1.0), (1.0, 1.0))
    for seed in range(6):
        torch.manual_seed(seed)
        out = whole(record)
        assert torch.equal(out, pixels) or torch.equal(out, pixels.flip(-1))
    default = make((0.08, 1.0), (3 / 4, 4 / 3))
    torch.manual_seed(0)
    assert not any(torch.equal(default(record), candidate) for candidate in (pixels, pixels.flip(-1)))


def _png(pixels: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


class Spy:
    """Wraps a transform class of an entry point and records the crop settings it was built with."""

    def __init__(self, cls):
        self.cls, self.calls = cls, []

    def __call__(self, *args, **kwargs):
        transform = self.cls(*args, **kwargs)
        self.calls.append(transform)
        return transform


def crop_of(transform) -> tuple:
    crop = transform.augment.transforms[0] if hasattr(transform, "augment") else transform.crop.transforms[0]
    return tuple(crop.scale), tuple(crop.ratio)


@pytest.fixture(scope="module")
def data_and_classifiers(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A 3-class image dataset and two classifiers converted from differently seeded random encoders."""
    root = tmp_path_factory.mktemp("semi")
    dataset = build_image_dataset(root, num_classes=3, per_class=8, val_per_class=2)
    config = write_config_folder(root / "config")
    classifiers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        encoder = root / f"encoder{seed}"
        ViTNepaForPreTraining(ViTNepaConfig.from_pretrained(config)).save_pretrained(encoder)
        (encoder / "preprocessor_config.json").write_text((config / "preprocessor_config.json").read_text())
        local_dir = root / f"cls{seed}"
        init_nepa_cls_from_pretrain.main(
            ["--pretrained_model_id", str(encoder), "--dataset_name", str(dataset), "--save_local", "--local_dir", str(local_dir)]
        )
        classifiers.append(local_dir)
    return dataset, classifiers


def test_pretraining_builds_its_crop_from_the_flags(tmp_path, monkeypatch, data_and_classifiers):
    dataset, _ = data_and_classifiers
    spy = Spy(train_pretrain.RandomCropFlip)
    monkeypatch.setattr(train_pretrain, "RandomCropFlip", spy)
    train_pretrain.main([
        "--config_name", str(dataset.parent / "config"), "--dataset_name", str(dataset), "--load_from_disk", "True",
        "--output_dir", str(tmp_path / "pre"), "--do_train", "--max_steps", "1", "--per_device_train_batch_size", "4",
        "--save_strategy", "no", "--crop_scale", "0.5", "1", "--crop_ratio", "0.9", "1.1", *COMMON,
    ])  # fmt: skip
    assert [crop_of(transform) for transform in spy.calls] == [((0.5, 1.0), (0.9, 1.1))]


def test_finetuning_trains_every_encoder_on_the_same_labelled_subset_with_the_flagged_crop(
    tmp_path, monkeypatch, data_and_classifiers
):
    dataset, classifiers = data_and_classifiers
    transforms = Spy(train_finetune.FinetuneTransform)
    monkeypatch.setattr(train_finetune, "FinetuneTransform", transforms)
    subsets = []
    real_split = train_finetune.training_split
    monkeypatch.setattr(train_finetune, "training_split", lambda *a: subsets.append(real_split(*a)) or subsets[-1])
    for index, classifier in enumerate(classifiers):
        train_finetune.main([
            "--model_name_or_path", str(classifier), "--dataset_name", str(dataset), "--load_from_disk", "True",
            "--output_dir", str(tmp_path / f"sft{index}"), "--do_train", "--do_eval", "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--save_strategy", "no", "--seed", "3",
            "--labels_per_class", "2", "--crop_scale", "0.5", "1", "--crop_ratio", "1", "1", "--aa", "", *COMMON,
        ])  # fmt: skip
    assert [crop_of(transform) for transform in transforms.calls] == [((0.5, 1.0), (1.0, 1.0))] * 2
    first, second = (subset.cast_column("image", Image(decode=False))["image"] for subset in subsets)
    assert len(first) == 6 and first == second
    assert np.bincount(subsets[0]["label"]).tolist() == [2, 2, 2]
