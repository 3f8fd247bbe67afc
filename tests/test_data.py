"""The fast image paths of `nepa.data` give the pixels of the plain torchvision / timm formulations."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.data import create_transform
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from nepa.data import ChannelsLastResizedCrop, FinetuneTransform, decode_rgb_tensor

MEAN = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def photographs() -> list[dict]:
    """scikit-learn's two colour photographs as JPEG records, landscape and portrait, ImageNet-sized."""
    records = []
    for index, array in enumerate(load_sample_images().images):
        image = Image.fromarray(array).resize((500, 375) if index == 0 else (375, 500), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        records.append({"bytes": buffer.getvalue(), "path": None})
    return records


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.mark.parametrize("interpolation", [v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC])
def test_channels_last_crop_gives_torchvisions_pixels(photographs, interpolation):
    for record in photographs:
        pixels = decode_rgb_tensor(record)
        for seed in range(8):
            torch.manual_seed(seed)
            expected = v2.RandomResizedCrop(224, interpolation=interpolation, antialias=True)(pixels)
            torch.manual_seed(seed)
            crop = ChannelsLastResizedCrop(224, interpolation=interpolation, antialias=True)(pixels)
            assert crop.shape == (3, 224, 224)
            assert crop.permute(1, 2, 0).is_contiguous()
            assert torch.equal(crop, expected)


def test_finetune_transform_gives_the_pixels_of_the_plain_composition(photographs):
    """Crop, flip and timm's RandAugment drawn from the same seeds give identical images: the layout change
    and the PIL hand-over touch no pixel."""
    _, rand_augment, _ = create_transform(
        224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
        color_jitter=None, mean=MEAN, separate=True,
    )
    crop_and_flip = v2.Compose(
        [v2.RandomResizedCrop(224, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.RandomHorizontalFlip()]
    )
    transform = FinetuneTransform(224, "rand-m9-mstd0.5-inc1", MEAN)
    for record in photographs:
        for seed in range(16):
            seed_everything(seed)
            expected = TF.pil_to_tensor(rand_augment(TF.to_pil_image(crop_and_flip(decode_rgb_tensor(record)))))
            seed_everything(seed)
            assert torch.equal(transform(record), expected)
