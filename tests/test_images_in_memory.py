"""The small-image fast path (`--images_in_memory`): batch crops drawn as torchvision's RandomResizedCrop draws them,
with its pixels, from a split decoded once; and the entry points honour or refuse the flag."""

import io

import datasets
import numpy as np
import pytest
import torch
from helpers import COMMON, build_image_dataset, write_config_folder
from PIL import Image
from scipy.stats import ks_2samp
from sklearn.datasets import load_sample_images
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import init_nepa_cls_from_pretrain
import train_finetune
import train_pretrain
from nepa.data import (
    BatchResizedCrop,
    EvalTransform,
    FinetuneTransform,
    ImageDataset,
    ImagesInMemory,
    RandomCropFlip,
)

INTERPOLATION = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def png_split(images: list[np.ndarray]) -> datasets.Dataset:
    records = []
    for array in images:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")
        records.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": records, "label": list(range(len(records)))}, features=features)


def smooth_images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 (count, 3, H, W): shapes with edges and gradients, like small photographs of objects."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, height // 4, width // 4, generator=generator) * 255
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    edges = (torch.rand(count, 1, height, width, generator=generator) > 0.8) * 120.0
    return (smooth + edges).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize(
    "height, width, scale, ratio",
    [(28, 28, (0.08, 1.0), (3 / 4, 4 / 3)), (20, 37, (0.5, 1.0), (3 / 4, 4 / 3)), (28, 28, (0.9, 1.0), (2.0, 3.0))],
)  # the last draws many central-crop fallbacks
def test_boxes_follow_random_resized_crops_distribution(height, width, scale, ratio):
    draws = 10000
    ours = BatchResizedCrop(28, scale, ratio).boxes(draws, height, width, torch.Generator().manual_seed(0)).numpy()
    torch.manual_seed(0)
    reference = v2.RandomResizedCrop(28, scale=scale, ratio=ratio)
    image = torch.zeros(3, height, width)
    theirs = np.array([[p["left"], p["top"], p["width"], p["height"]] for p in map(reference.make_params, [[image]] * draws)])
    for column, name in enumerate(("left", "top", "width", "height")):
        assert ks_2samp(ours[:, column], theirs[:, column]).pvalue > 1e-3, name
    assert (ours[:, 2] <= width).all() and (ours[:, 0] + ours[:, 2] <= width).all()
    assert (ours[:, 3] <= height).all() and (ours[:, 1] + ours[:, 3] <= height).all()
    assert abs(central_crops(ours, height, width) - central_crops(theirs, height, width)) < 0.02


def central_crops(boxes: np.ndarray, height: int, width: int) -> float:
    """The fraction of boxes that span one side of the image and not the other: the fallback's shape."""
    return np.mean((boxes[:, 2] == width) & (boxes[:, 3] < height) | (boxes[:, 3] == height) & (boxes[:, 2] < width))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("source, size", [("small", 28), ("photograph", 64)])
def test_batch_crops_have_the_pixels_of_a_crop_then_resize(interpolation, source, size):
    """Each crop is torchvision's `resized_crop` with antialiasing of the same box, up to the rounding of torch's
    fixed-point uint8 kernels: upsampling (28 px crops to 28) and downsampling (photograph crops to 64)."""
    if source == "small":
        pixels = smooth_images(64, 28, 28)
    else:
        photograph = torch.from_numpy(load_sample_images().images[0].copy()).permute(2, 0, 1)[:, :300, :400]
        pixels = photograph.contiguous().expand(16, -1, -1, -1)
    crop = BatchResizedCrop(size, interpolation=interpolation, flip=False)
    boxes = crop.boxes(len(pixels), *pixels.shape[-2:], torch.Generator().manual_seed(0))
    crops = crop.resample(pixels, boxes)
    differences = []
    for image, box, result in zip(pixels, boxes.tolist(), crops):
        left, top, width, height = box
        expected = TF.resized_crop(image, top, left, height, width, [size, size], INTERPOLATION[interpolation], antialias=True)
        differences.append((result.int() - expected.int()).abs())
    differences = torch.stack(differences).float()
    assert differences.max() <= 2
    assert differences.mean() < 0.1


def test_a_whole_image_crop_without_flip_gives_the_images_pixels():
    pixels = smooth_images(16, 28, 28)
    for interpolation in ("bilinear", "bicubic"):
        crop = BatchResizedCrop(28, scale=(1, 1), ratio=(1, 1), interpolation=interpolation, flip=False)
        assert torch.equal(crop(pixels, torch.Generator().manual_seed(0)), pixels)


def test_the_flip_mirrors_about_half_of_the_crops():
    pixels = smooth_images(400, 28, 28)
    whole = BatchResizedCrop(28, scale=(1, 1), ratio=(1, 1))(pixels, torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(crop, image.flip(-1)) for crop, image in zip(whole, pixels)])
    unchanged = torch.tensor([torch.equal(crop, image) for crop, image in zip(whole, pixels)])
    assert (mirrored | unchanged).all()
    assert 150 < mirrored.sum() < 250


def test_the_dataset_decodes_once_and_seeds_each_batch_from_the_epoch_and_its_images():
    arrays = [np.asarray(smooth_images(1, 28, 28, seed)[0].permute(1, 2, 0)) for seed in range(12)]
    split = png_split(arrays)
    evaluation = ImagesInMemory(split, EvalTransform(28, crop_pct=1.0), seed=0)
    per_image = ImageDataset(split, EvalTransform(28, crop_pct=1.0), seed=0)
    for index in range(len(split)):
        assert torch.equal(evaluation[index]["pixel_values"], per_image[index]["pixel_values"])
        assert evaluation[index]["labels"] == index

    training = ImagesInMemory(split, RandomCropFlip(28, (0.3, 1.0)), label_column=None, seed=0)
    assert "labels" not in training[0]
    batch = lambda indices: torch.stack([example["pixel_values"] for example in training.__getitems__(indices)])  # noqa: E731
    first_epoch = batch([3, 1, 4])
    assert torch.equal(batch([3, 1, 4]), first_epoch)  # a resumed run draws the same crops
    assert not torch.equal(batch([3, 1, 5])[:2], first_epoch[:2])  # another batch, other draws
    training.set_epoch(1)
    assert not torch.equal(batch([3, 1, 4]), first_epoch)


def test_what_the_batch_path_cannot_do_is_refused():
    with pytest.raises(ValueError, match="--aa rand-m9-mstd0.5-inc1"):
        FinetuneTransform(28, "rand-m9-mstd0.5-inc1", (0.5,) * 3).in_memory()
    mixed = png_split([np.zeros((28, 28, 3), np.uint8), np.zeros((32, 28, 3), np.uint8)])
    with pytest.raises(ValueError, match="--images_in_memory needs images of one size"):
        ImagesInMemory(mixed, RandomCropFlip(28), seed=0)


def test_entry_points_train_from_memory_and_refuse_randaugment(tmp_path):
    dataset = build_image_dataset(tmp_path / "data", num_classes=3, per_class=8, val_per_class=4)
    config = write_config_folder(tmp_path / "config")
    fast = ["--images_in_memory", "True", "--dataloader_num_workers", "0", *COMMON, "--seed", "0"]
    pretrained = tmp_path / "pretrained"
    train_pretrain.main([
        "--config_name", str(config), "--dataset_name", str(dataset), "--load_from_disk", "True",
        "--output_dir", str(pretrained), "--do_train", "--max_steps", "3", "--per_device_train_batch_size", "8",
        "--save_strategy", "no", "--do_eval", *fast,
    ])  # fmt: skip
    assert (pretrained / "model.safetensors").is_file()
    classifier = tmp_path / "cls"
    init_nepa_cls_from_pretrain.main([
        "--pretrained_model_id", str(pretrained), "--save_local", "--local_dir", str(classifier), "--dataset_name", str(dataset),
    ])  # fmt: skip
    finetune = [
        "--model_name_or_path", str(classifier), "--dataset_name", str(dataset), "--load_from_disk", "True",
        "--output_dir", str(tmp_path / "finetuned"), "--do_train", "--do_eval", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--save_strategy", "no", *fast,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--aa rand-m9-mstd0.5-inc1"):
        train_finetune.main(finetune)
    metrics = train_finetune.main([*finetune, "--aa", ""])
    assert "eval_accuracy" in metrics
