"""Datasets, image decoding, transforms and batch collation shared by every entry point.

Every dataset is a `DatasetDict` with `train` / `validation` splits, an `image` column and a
`label` column (what `download_dataset.py` writes). Images are read as raw bytes and decoded here,
so that an undecodable file is skipped with a log line instead of killing a long run.

Per-image work happens on uint8 tensors (or PIL images for timm's RandAugment) and batches travel
as uint8; the float conversion, normalisation, random erasing and mixup run once per batch on the
training device (`BatchNormalize`, `BatchAugment`, applied by `nepa.trainer.NepaTrainer`).
"""

import io
import logging
import math
import os
import random
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

logger = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = None  # large photographs are data, not decompression bombs, in a training set


class BadImageError(ValueError):
    """An image that cannot be decoded; carries the file's path for the log."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path = path


def record_path(record: dict) -> str:
    """The path that names an image record `{"bytes", "path"}` in errors and logs."""
    path = record.get("path") or "<embedded bytes>"
    if path.startswith("file://"):  # download_dataset.py names files by URI; the log shows them as plain paths
        path = url2pathname(urlparse(path).path)
    return path


def read_image_bytes(record: dict) -> tuple[bytes, str]:
    """The raw bytes of an image record `{"bytes", "path"}`, and the path that names it in errors."""
    path = record_path(record)
    data = record.get("bytes")
    if data is None:
        if not record.get("path"):
            raise BadImageError(path, "the record has neither bytes nor a path")
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise BadImageError(path, str(error)) from error
    if not data:
        raise BadImageError(path, "empty file")
    return data, path


def decode_rgb_tensor(record: dict) -> torch.Tensor:
    """Decode `{"bytes", "path"}` to a uint8 RGB tensor (3, H, W), whatever the file's mode or depth.

    torchvision's decoders (libjpeg-turbo, libpng, ...) do the common formats; PIL covers the rest
    (TIFF, BMP, palette and exotic modes)."""
    data, path = read_image_bytes(record)
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return TF.pil_to_tensor(open_rgb_pil(record))
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


@contextmanager
def open_pil(record: dict):
    """`with open_pil(record) as image:` the decoded PIL image of `{"bytes", "path"}`, in its own mode; what
    Pillow raises while it is open becomes a `BadImageError` naming the file."""
    data, path = read_image_bytes(record)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            yield image
    except UnidentifiedImageError as error:
        raise BadImageError(path, "not an image format Pillow or torchvision can read") from error
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError) as error:  # PIL's decoders raise all three
        raise BadImageError(path, f"{type(error).__name__}: {error}") from error


def open_rgb_pil(record: dict) -> Image.Image:
    """Decode `{"bytes", "path"}` to an RGB PIL image; raise `BadImageError` if it won't decode."""
    with open_pil(record) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: keep the top 8 bits
            image = image.point(lambda value: value / 256).convert("L")
        return image.convert("RGB")


# --- transforms: record -> uint8 tensor (3, size, size) -------------------------------------------


# The paper's RandomResizedCrop (torchvision's defaults); on small images a larger minimum scale keeps the
# crop recognisable (an 8 % crop of a 28 px image is 8 x 8 pixels).
DEFAULT_CROP_SCALE = (0.08, 1.0)
DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)
# The paper's RandAugment policy (timm's notation), for fine-tuning and the attentive probe alike.
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
DEFAULT_CROP_PCT = 0.875  # evaluation: the centre crop's share of the resized shorter side (timm's default)


def triangle_filter(t: torch.Tensor) -> torch.Tensor:
    return (1 - t.abs()).clamp_(min=0)


def cubic_filter(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution with PIL's and torch's a = -0.5."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def resampling_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, filter) -> torch.Tensor:
    """(batch, out_size, in_size) weights that resample pixels [start, start + length) of each row to out_size
    pixels: the separable filter of torch's (and PIL's) antialiased resize, stretched by the scale when it shrinks,
    normalised over the pixels inside the crop (so the crop's edge is clamped, as when cropping first)."""
    scale = (length / out_size).double()
    stretch = scale.clamp(min=1.0)
    centre = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale[:, None]  # in crop coordinates
    pixel = torch.arange(in_size, dtype=torch.float64) - start[:, None]  # each input pixel, in crop coordinates
    weights = filter((pixel[:, None, :] + 0.5 - centre[:, :, None]) / stretch[:, None, None])
    inside = (pixel >= 0) & (pixel < length[:, None])
    weights = weights * inside[:, None, :]
    return (weights / weights.sum(-1, keepdim=True)).float()


class BatchResizedCrop:
    """RandomResizedCrop and horizontal flip of a whole batch of same-size uint8 images, in two batched matmuls.

    The boxes are drawn as torchvision's `RandomResizedCrop` draws them (ten tries of an area fraction uniform in
    `scale` and an aspect ratio log-uniform in `ratio`, rounded sides, a uniform corner; else the central crop that
    fits `ratio`), for every image of the batch at once. Each box is resampled with the weights of torch's
    antialiased bilinear or bicubic resize of the cropped image (`resampling_weights`), as one matrix per image for
    the rows and one for the columns: the pixels of `TF.resized_crop(..., antialias=True)` up to rounding (torch's
    uint8 kernels use fixed-point weights). Drawn from `generator`, so the caller decides how the batch is seeded."""

    TRIES = 10
    FILTERS = {"bilinear": triangle_filter, "bicubic": cubic_filter}

    def __init__(self, size: int, scale=DEFAULT_CROP_SCALE, ratio=DEFAULT_CROP_RATIO, interpolation="bilinear", flip=True):
        self.size = size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.filter = self.FILTERS[interpolation]
        self.flip = flip

    def boxes(self, count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(count, 4) integer boxes `left, top, width, height`, distributed as `RandomResizedCrop.make_params`."""
        shape = (count, self.TRIES)
        area = height * width * torch.empty(shape, dtype=torch.float64).uniform_(*self.scale, generator=generator)
        log_ratio = torch.empty(shape, dtype=torch.float64)
        log_ratio.uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=generator)
        aspect = torch.exp(log_ratio)
        crop_w = torch.round(torch.sqrt(area * aspect)).long()
        crop_h = torch.round(torch.sqrt(area / aspect)).long()
        fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits, as the loop takes it
        crop_w, crop_h = crop_w.gather(1, first)[:, 0], crop_h.gather(1, first)[:, 0]
        corner = torch.rand(count, 2, dtype=torch.float64, generator=generator)
        top = (corner[:, 0] * (height - crop_h + 1)).long()
        left = (corner[:, 1] * (width - crop_w + 1)).long()
        fallback = ~fits.any(dim=1)
        if fallback.any():
            w, h = self.central_crop(height, width)
            crop_w[fallback], crop_h[fallback] = w, h
            top[fallback], left[fallback] = (height - h) // 2, (width - w) // 2
        return torch.stack([left, top, crop_w, crop_h], dim=1)

    def central_crop(self, height: int, width: int) -> tuple[int, int]:
        """RandomResizedCrop's fallback when no try fits: the whole image, cut to the nearest ratio in `ratio`."""
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            return width, int(round(width / min(self.ratio)))
        if in_ratio > max(self.ratio):
            return int(round(height * max(self.ratio))), height
        return width, height

    def resample(self, pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """uint8 (batch, C, H, W) and boxes `left, top, width, height` -> uint8 (batch, C, size, size)."""
        height, width = pixels.shape[-2:]
        left, top, crop_w, crop_h = boxes.unbind(1)
        rows = resampling_weights(top, crop_h, height, self.size, self.filter)  # (batch, size, H)
        columns = resampling_weights(left, crop_w, width, self.size, self.filter)  # (batch, size, W)
        # Width first, rounded to 8 bits, then height: the passes of torch's uint8 kernel (bicubic overshoots, and
        # the intermediate clamp is part of its result).
        count, channels = pixels.shape[:2]
        crops = torch.bmm(pixels.float().view(count, channels * height, width), columns.transpose(1, 2))
        crops = crops.round_().clamp_(0, 255).view(count, channels, height, self.size).transpose(1, 2)
        crops = torch.bmm(rows, crops.reshape(count, height, channels * self.size))
        crops = crops.view(count, self.size, channels, self.size).transpose(1, 2)
        return crops.round_().clamp_(0, 255).to(torch.uint8)

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, _, height, width = pixels.shape
        crops = self.resample(pixels, self.boxes(count, height, width, generator))
        if self.flip:
            flipped = torch.rand(count, generator=generator) < 0.5
            crops[flipped] = crops[flipped].flip(-1)
        return crops


class RandomCropFlip:
    """RandomResizedCrop + horizontal flip on uint8 tensors (normalisation happens per batch): the training images of
    pretraining and of the linear probe."""

    def __init__(self, size: int, scale=DEFAULT_CROP_SCALE, ratio=DEFAULT_CROP_RATIO):
        self.augment = v2.Compose(
            [v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True), v2.RandomHorizontalFlip()]
        )
        self.batch_crop = BatchResizedCrop(size, scale, ratio)

    def __call__(self, record: dict) -> torch.Tensor:
        return self.augment(decode_rgb_tensor(record))

    def in_memory(self):
        """(what `ImagesInMemory` applies to each image once, what it applies to each batch)."""
        return decode_rgb_tensor, self.batch_crop


class EvalTransform:
    """Resize the shorter side to `resize_size` (bicubic), then centre-crop `size`."""

    def __init__(self, size: int, resize_size: int | None = None, crop_pct: float | None = None):
        if resize_size is None:
            resize_size = int(size / crop_pct) if crop_pct else size
        self.resize = v2.Compose(
            [v2.Resize(resize_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size)]
        )

    def __call__(self, record: dict) -> torch.Tensor:
        return self.resize(decode_rgb_tensor(record))

    def in_memory(self):
        """Deterministic: applied to each image once, when `ImagesInMemory` decodes the split."""
        return self, None


class ChannelsLastResizedCrop(v2.RandomResizedCrop):
    """`v2.RandomResizedCrop` (same sampling, same pixels) whose output is laid out channels-last.

    The crop is copied channels-last before it is resampled: torch's uint8 antialiased bicubic kernel
    works channels-last, and handed a channels-first crop it converts in and out. The channels-last
    result also becomes a PIL image without a transposing copy. Both took as long as the resize."""

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        crop = TF.crop(inpt, params["top"], params["left"], params["height"], params["width"])
        crop = crop.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        return TF.resize(crop, self.size, interpolation=self.interpolation, antialias=self.antialias)


class FinetuneTransform:
    """timm's ImageNet fine-tuning recipe: bicubic RandomResizedCrop and flip (on uint8 tensors, as in
    pretraining), then timm's RandAugment on a PIL image of the crop. Normalisation and random erasing
    are the batch's (see `BatchAugment`). `mean` is the fill colour of RandAugment's geometric ops."""

    def __init__(self, size: int, auto_augment: str | None, mean, scale=DEFAULT_CROP_SCALE, ratio=DEFAULT_CROP_RATIO):
        self.crop = v2.Compose(
            [
                ChannelsLastResizedCrop(
                    size, scale=tuple(scale), ratio=tuple(ratio), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
                ),
                v2.RandomHorizontalFlip(),
            ]
        )
        self.batch_crop = BatchResizedCrop(size, scale, ratio, interpolation="bicubic")
        self.auto_augment = auto_augment
        self.rand_augment = None
        if auto_augment:
            from timm.data import create_transform

            _, self.rand_augment, _ = create_transform(
                size, is_training=True, auto_augment=auto_augment, interpolation="bicubic",
                color_jitter=None, mean=tuple(mean), separate=True,
            )

    def __call__(self, record: dict) -> torch.Tensor:
        pixels = self.crop(decode_rgb_tensor(record))
        if self.rand_augment is None:
            return pixels
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())  # (H, W, 3) view of channels-last memory
        return TF.pil_to_tensor(self.rand_augment(image))

    def in_memory(self):
        """The crop and flip per batch (`BatchResizedCrop`, bicubic); RandAugment is PIL's, image by image, and has
        no batch form here."""
        if self.auto_augment:
            raise ValueError(
                f"--images_in_memory crops whole batches and cannot apply RandAugment (--aa {self.auto_augment}): pass "
                f"--aa '' to train without it, or --images_in_memory False to keep it."
            )
        return decode_rgb_tensor, self.batch_crop


# --- dataset ---------------------------------------------------------------------------------------


@contextmanager
def seeded_random(seed: int):
    """Run the block with torch's CPU generator, `random` and numpy seeded by `seed`.

    Afterwards `random` and numpy continue from seeds drawn from their own streams before the block: the
    process's sequences stay deterministic without saving numpy's large state, which costs more than a crop."""
    python_next, numpy_next = random.getrandbits(64), int(np.random.randint(2**32))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed also reseeds CUDA
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.seed(python_next)
            np.random.seed(numpy_next)


class ImageDataset(torch.utils.data.Dataset):
    """One split of an image dataset, transformed, with undecodable images skipped.

    A bad image is replaced by the next decodable one (so batches keep their size), and the log names
    the file and counts the skips; `strict=True` makes the first bad image an error instead.

    Each image's random augmentation is drawn from its own seed (`seed`, the epoch, the index) rather than
    from the process's random state, which the dataloader advances ahead of the model (it fetches a batch
    in advance): a resumed run then draws exactly what the uninterrupted run drew, and the draws do not
    depend on the number of dataloader workers or training processes. `NepaTrainer` calls `set_epoch`."""

    def __init__(
        self,
        split: datasets.Dataset,
        transform,
        image_column="image",
        label_column="label",
        strict=False,
        seed: int | None = None,
    ):
        for column in (image_column, label_column):
            if column and column not in split.column_names:
                raise ValueError(
                    f"column {column!r} not in the dataset (columns: {split.column_names}); "
                    f"name the right one with --image_column_name / --label_column_name."
                )
        self.split = split.cast_column(image_column, datasets.Image(decode=False))
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.strict = strict
        self.skipped = 0
        self.seed = torch.initial_seed() if seed is None else seed  # default: the run's `set_seed`
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by persistent dataloader workers too

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self)):
            row = self.split[(index + attempt) % len(self)]
            image_seed = int(np.random.SeedSequence([self.seed, int(self.epoch), index, attempt]).generate_state(1)[0])
            try:
                with seeded_random(image_seed):
                    return self.example(row)
            except BadImageError as error:
                if self.strict:
                    raise
                self.skipped += 1
                logger.warning("skipped %s (%d skipped so far in process %d)", error, self.skipped, os.getpid())
        raise BadImageError(f"all {len(self)} images of the split", "none decodes")

    def example(self, row: dict) -> dict:
        """One training example from one row, drawn under the image's seed."""
        example = {"pixel_values": self.transform(row[self.image_column])}
        if self.label_column:
            example["labels"] = row[self.label_column]
        return example


class ImagesInMemory(torch.utils.data.Dataset):
    """A split decoded once into one uint8 tensor (N, 3, H, W): the fast path for small images (`--images_in_memory`).

    For datasets that fit in memory (Fashion-MNIST's 60,000 images are 141 MiB at 28 px in RGB, CIFAR-10's 50,000
    154 MiB). `transform.in_memory()` names what runs once per image (the decode; evaluation's resize and centre
    crop, which are deterministic) and what runs per batch (`BatchResizedCrop`): the dataloader fetches a whole batch
    through `__getitems__`: one crop call per batch instead of a transform per image, fast enough without workers.

    As `ImageDataset`: undecodable images are left out with a log line (`strict=True`: an error), and a batch's
    random crops are drawn from a seed of (`seed`, the epoch, the batch's indices), so a resumed run draws what the
    uninterrupted one drew. Every image must have one size after the per-image step."""

    def __init__(self, split: datasets.Dataset, transform, image_column="image", label_column="label", strict=False,
                 seed: int | None = None):  # fmt: skip
        once, self.batch_transform = transform.in_memory()
        records = split.cast_column(image_column, datasets.Image(decode=False))[image_column]
        labels = split[label_column] if label_column else None
        kept, images = [], None
        for index, record in enumerate(records):
            try:
                image = once(record)
            except BadImageError as error:
                if strict:
                    raise
                logger.warning("skipped %s", error)
                continue
            if images is None:
                images = torch.empty((len(records), *image.shape), dtype=torch.uint8)
            if image.shape != images.shape[1:]:
                raise ValueError(
                    f"--images_in_memory needs images of one size; {record_path(record)} is {tuple(image.shape)} "
                    f"and the first was {tuple(images.shape[1:])}. Leave --images_in_memory off for this dataset."
                )
            images[len(kept)] = image
            kept.append(index)
        if not kept:
            raise BadImageError(f"all {len(records)} images of the split", "none decodes")
        self.pixels = images[: len(kept)]
        self.labels = torch.tensor([labels[index] for index in kept]) if labels is not None else None
        self.seed = torch.initial_seed() if seed is None else seed
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        logger.info("%d images in memory: %.0f MiB", len(kept), self.pixels.numel() / 2**20)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        pixels = self.pixels[indices]
        if self.batch_transform is not None:
            seed = np.random.SeedSequence([self.seed, int(self.epoch), *indices]).generate_state(2)
            generator = torch.Generator().manual_seed(int(seed[0]) << 32 | int(seed[1]))
            pixels = self.batch_transform(pixels, generator)
        examples = [{"pixel_values": image} for image in pixels]
        if self.labels is not None:
            for example, label in zip(examples, self.labels[indices].tolist()):
                example["labels"] = label
        return examples

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


def collate_images(examples: list[dict]) -> dict:
    """Stack uint8 images (and labels): 4x fewer bytes to pin and copy than float pixels."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([example["labels"] for example in examples])
    return batch


class BatchNormalize:
    """uint8 (batch, 3, H, W) -> float32 `(x / 255 - mean) / std`, on whatever device the batch is on."""

    def __init__(self, mean, std):
        self.scale = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.is_floating_point():
            raise TypeError("BatchNormalize expects uint8 pixels; these are already floating point.")
        if self.scale.device != pixels.device:  # once, not a host-to-device copy every step
            self.scale, self.shift = self.scale.to(pixels.device), self.shift.to(pixels.device)
        # In place: one float batch allocated instead of three (on the CPU the page faults cost more than the math).
        return pixels.float().mul_(self.scale).sub_(self.shift)


class BatchAugment:
    """Training-time batch augmentations of fine-tuning, on normalised pixels: timm's `RandomErasing`,
    then timm's `Mixup` (mixup / cutmix / label smoothing -> soft labels). Mixup pairs images, so an odd
    batch drops its last image."""

    def __init__(self, random_erasing=None, mixup=None):
        self.random_erasing = random_erasing
        self.mixup = mixup

    def __call__(self, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.random_erasing is not None:
            pixels = self.random_erasing(pixels)
        if self.mixup is not None:
            if len(pixels) % 2:
                pixels, labels = pixels[:-1], labels[:-1]
            pixels, labels = self.mixup(pixels, labels)
        return pixels, labels


def processor_image_size(processor, patch_size: int) -> int:
    """The square input size an image processor produces, checked against the model's patch size."""
    size = processor.size.get("height") or processor.size.get("shortest_edge")
    if size % patch_size:
        raise ValueError(
            f"the image processor's size {size} is not a multiple of patch_size {patch_size}: "
            f"fix preprocessor_config.json or the model config."
        )
    return size


# --- loading ---------------------------------------------------------------------------------------


def load_image_dataset(data_args) -> datasets.DatasetDict:
    """Open the dataset named by `DataArguments`: a `save_to_disk` folder, image folders, or a Hub id."""
    if data_args.train_dir or data_args.validation_dir:
        data_files = {}
        for split, folder in (("train", data_args.train_dir), ("validation", data_args.validation_dir)):
            if folder:
                if not Path(folder).is_dir():
                    raise FileNotFoundError(f"--{split}_dir {folder} is not a directory.")
                data_files[split] = str(Path(folder) / "**")
        return datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=data_args.cache_dir)
    if not data_args.dataset_name:
        raise ValueError("no data: pass --dataset_name (with --load_from_disk True for a local folder) or --train_dir.")
    if data_args.load_from_disk:
        if not Path(data_args.dataset_name).is_dir():
            raise FileNotFoundError(
                f"dataset folder {data_args.dataset_name} does not exist: build it first, e.g. "
                f"`python download_dataset.py --dataset fashion-mnist` or `python download_dataset.py --imagefolder DIR`."
            )
        return datasets.load_from_disk(data_args.dataset_name)
    try:
        return datasets.load_dataset(data_args.dataset_name, cache_dir=data_args.cache_dir)
    except Exception as error:  # offline, gated or misspelt: all end in the same advice
        raise RuntimeError(
            f"could not load {data_args.dataset_name!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            f"Offline, save it to disk first with download_dataset.py and pass the folder with --load_from_disk True."
        ) from error


def get_split(
    dataset: datasets.DatasetDict, name: str, max_samples: int | None = None, seed: int = 0, label_column: str = "label"
) -> datasets.Dataset:
    """A split by name (`validation` also found as `val` or `test`), optionally `max_samples` rows of it
    (`sample_rows`)."""
    aliases = {"validation": ("validation", "val", "test")}.get(name, (name,))
    found = next((alias for alias in aliases if alias in dataset), None)
    if found is None:
        raise KeyError(f"the dataset has no {name!r} split (splits: {list(dataset.keys())}).")
    split = dataset[found]
    if max_samples is not None and max_samples < len(split):
        split = sample_rows(split, max_samples, seed, label_column)
    return split


def label_array(split: datasets.Dataset, label_column: str = "label") -> np.ndarray:
    """A split's labels as one array, read through Arrow (a list of ImageNet's 1.28 M labels takes a minute)."""
    return split.with_format("arrow", columns=[label_column])[:][label_column].to_numpy()


def has_class_labels(split: datasets.Dataset, label_column: str = "label") -> bool:
    """Whether `label_column` holds one integer class per image (not a mask, a string or nothing)."""
    feature = split.features.get(label_column)
    return isinstance(feature, datasets.ClassLabel) or (isinstance(feature, datasets.Value) and feature.dtype.startswith("int"))


def sample_rows(split: datasets.Dataset, size: int, seed: int, label_column: str = "label") -> datasets.Dataset:
    """`size` rows of `split` drawn with `seed`, in the split's order. With class labels the pick is class-balanced:
    every class gives `size // classes` images or one more (a class with fewer gives all it has, and the others
    make up the rest); the first rows of a sorted split would cover a few classes only. Without labels, a uniform
    pick. The pick depends on the labels and `seed` alone, so every script picks the same rows."""
    generator = np.random.default_rng(seed)
    order = generator.permutation(len(split))
    if not has_class_labels(split, label_column):
        return split.select(np.sort(order[:size]))
    labels = label_array(split, label_column)[order]
    by_class = np.argsort(labels, kind="stable")  # each class's rows, in the random order
    starts = np.searchsorted(labels[by_class], labels[by_class], side="left")
    rank = np.empty(len(order), dtype=np.int64)
    rank[by_class] = np.arange(len(order)) - starts  # a row's place among its class's rows
    return split.select(np.sort(order[np.argsort(rank, kind="stable")[:size]]))


def training_split(dataset: datasets.DatasetDict, data_args, seed: int) -> datasets.Dataset:
    """The train split that `DataArguments` ask for: all of it, a random `max_train_samples`, or a labelled subset."""
    split = get_split(dataset, "train", data_args.max_train_samples, seed, data_args.label_column_name)
    if data_args.labels_per_class is not None:
        split = labelled_subset(split, data_args.labels_per_class, seed, data_args.label_column_name)
    return split


def labelled_subset(split: datasets.Dataset, labels_per_class: float, seed: int, label_column: str = "label") -> datasets.Dataset:
    """The semi-supervised protocol's training set: `labels_per_class` images of every class (or, below 1, that
    fraction of each class), drawn with `seed` from the labels alone, so every model trained with the same seed
    sees the same images."""
    if label_column not in split.column_names:
        raise ValueError(f"--labels_per_class needs labels, and the split has no column {label_column!r}.")
    labels = label_array(split, label_column)
    generator = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = round(labels_per_class * len(members)) if labels_per_class < 1 else int(labels_per_class)
        if not 1 <= count <= len(members):
            raise ValueError(
                f"--labels_per_class {labels_per_class} asks for {count} images of class {label}, which has "
                f"{len(members)}: ask for between 1 and {len(members)} (or a larger fraction)."
            )
        chosen.append(generator.choice(members, size=count, replace=False))
    return split.select(np.sort(np.concatenate(chosen)))


def label_names(split: datasets.Dataset, label_column: str = "label") -> list[str] | None:
    feature = split.features.get(label_column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def num_classes(split: datasets.Dataset, label_column: str = "label") -> int:
    """The class count of a `ClassLabel` column, else the largest integer label + 1."""
    names = label_names(split, label_column)
    return len(names) if names is not None else int(label_array(split, label_column).max()) + 1


def check_labels_fit(split: datasets.Dataset, label_column: str, num_labels: int, dataset_name: str | None) -> None:
    """Raise `ValueError` when the split's classes do not fit a classifier of `num_labels` outputs."""
    if label_column not in split.column_names:
        return
    names = label_names(split, label_column)
    if names is not None and len(names) > num_labels:
        raise ValueError(
            f"the dataset has {len(names)} classes but the classifier has num_labels={num_labels}: "
            f"convert again with --dataset_name {dataset_name} (or --num_labels {len(names)})."
        )
    largest = num_classes(split, label_column) - 1
    if names is None and largest >= num_labels:
        raise ValueError(
            f"the dataset has label {largest} but the classifier has num_labels={num_labels} "
            f"(labels 0..{num_labels - 1}): convert again with --num_labels {largest + 1}."
        )


def image_dataset(split: datasets.Dataset, transform, data_args, labels: bool = True, dataset_class=ImageDataset) -> ImageDataset:
    """`ImageDataset` (or a subclass) of a split with the columns and strictness that `DataArguments` name."""
    label_column = data_args.label_column_name if labels else None
    if data_args.images_in_memory:
        dataset_class = ImagesInMemory
    return dataset_class(split, transform, data_args.image_column_name, label_column, data_args.strict_images)
