"""Semantic segmentation: label masks, the joint image/mask transforms, sliding-window inference, the
confusion-matrix metrics and the Trainer that evaluates with them.

A segmentation dataset is what `download_dataset.py` writes for `ade20k` and `fashion-mnist-seg`: `train`
and `validation` splits with an `image` column and a `label` column holding the mask as a single-channel
PNG (one class index per pixel), and an `id2label.json` beside the splits. Pixels labelled `IGNORE_INDEX`
count in neither the loss nor the metrics.
"""

import json
import math
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from transformers.trainer_utils import EvalLoopOutput

from models.vit_nepa import save_model_code

from .data import BadImageError, ImageDataset, decode_rgb_tensor, open_pil, record_path
from .optim import layer_decay_param_groups
from .trainer import NepaTrainer

IGNORE_INDEX = 255
ID2LABEL_FILE = "id2label.json"


# --- masks and transforms: (uint8 image (3, H, W), uint8 mask (H, W)) -> the same, transformed ---------


def decode_mask(record: dict) -> torch.Tensor:
    """A label PNG -> uint8 (H, W) of class indices (palette PNGs give their palette indices)."""
    with open_pil(record) as image:
        if image.mode not in ("L", "P"):
            raise BadImageError(
                record_path(record), f"a label mask must be a single-channel 8-bit image (mode L or P), not {image.mode}"
            )
        return torch.from_numpy(np.array(image, dtype=np.uint8))


def keep_ratio_size(height: int, width: int, scale: tuple[int, int], ratio: float = 1.0) -> list[int]:
    """mmseg's keep-ratio rescale: the largest size with the long side <= max(scale) * ratio and the short
    side <= min(scale) * ratio."""
    factor = min(max(scale) * ratio / max(height, width), min(scale) * ratio / min(height, width))
    return [max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))]


def random_crop_box(mask: torch.Tensor, crop_size: int, cat_max_ratio: float) -> tuple[int, int, int, int]:
    """A random crop (top, left, height, width); with `cat_max_ratio` < 1, up to 10 draws to find one where
    no single class covers that fraction of the labelled pixels (mmseg's RandomCrop)."""
    height, width = mask.shape
    crop_h, crop_w = min(crop_size, height), min(crop_size, width)
    for _ in range(10):
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        if cat_max_ratio >= 1.0:
            break
        window = mask[top : top + crop_h, left : left + crop_w]
        _, counts = window[window != IGNORE_INDEX].unique(return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left, crop_h, crop_w


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """Float RGB (3, H, W) in [0, 1] -> HSV with hue, saturation and value in [0, 1]."""
    red, green, blue = image
    value, low = image.max(0).values, image.min(0).values
    spread = value - low
    saturation = torch.where(value > 0, spread / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    hue = torch.where(
        value == red, (green - blue) / safe, torch.where(value == green, 2 + (blue - red) / safe, 4 + (red - green) / safe)
    )
    hue = torch.where(spread > 0, (hue / 6) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value])


def hsv_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """The inverse of `rgb_to_hsv`."""
    hue, saturation, value = image
    sector = torch.floor(hue * 6)
    fraction = hue * 6 - sector
    p, q, t = value * (1 - saturation), value * (1 - saturation * fraction), value * (1 - saturation * (1 - fraction))
    sector = (sector.long() % 6)[None]
    red = torch.stack([value, q, p, p, t, value]).gather(0, sector)
    green = torch.stack([t, value, value, q, p, p]).gather(0, sector)
    blue = torch.stack([p, p, t, value, value, q]).gather(0, sector)
    return torch.cat([red, green, blue])


def photometric_distortion(
    image: torch.Tensor,
    brightness: float | None,
    contrast: float | None,
    saturation: float | None,
    hue: int | None,
    contrast_first: bool,
) -> torch.Tensor:
    """mmsegmentation's PhotoMetricDistortion with its random draws given (None: that step is not applied): add
    `brightness` to the pixel values (0-255), multiply them by `contrast` (first or last), multiply the HSV
    saturation by `saturation`, and turn the hue by `hue` OpenCV units (2 degrees each); values are clipped to
    0-255 after each step. Computed in floating point and rounded to uint8 once, at the end."""
    pixels = image.float()
    if brightness is not None:
        pixels = (pixels + brightness).clamp(0, 255)
    if contrast is not None and contrast_first:
        pixels = (pixels * contrast).clamp(0, 255)
    if saturation is not None or hue is not None:
        hsv = rgb_to_hsv(pixels / 255)
        if saturation is not None:
            hsv[1] = (hsv[1] * saturation).clamp(0, 1)
        if hue is not None:
            hsv[0] = (hsv[0] + hue / 180) % 1.0
        pixels = hsv_to_rgb(hsv) * 255
    if contrast is not None and not contrast_first:
        pixels = (pixels * contrast).clamp(0, 255)
    return pixels.round().clamp(0, 255).to(torch.uint8)


def draw_photometric_distortion() -> dict:
    """The random draws of mmsegmentation's PhotoMetricDistortion (its defaults): each step with probability 0.5,
    brightness +-32, contrast and saturation x0.5-1.5, hue -18..17 OpenCV units, contrast before or after the rest."""
    applied = torch.rand(4) < 0.5
    values = torch.empty(3).uniform_(0, 1)
    return dict(
        brightness=float(values[0] * 64 - 32) if applied[0] else None,
        contrast=float(values[1] + 0.5) if applied[1] else None,
        saturation=float(values[2] + 0.5) if applied[2] else None,
        hue=int(torch.randint(-18, 18, ())) if applied[3] else None,
        contrast_first=bool(torch.rand(()) < 0.5),
    )


class SegmentationTrainTransform:
    """The MAE/BEiT ADE20K training pipeline: keep-ratio resize of the image to `scale` times a ratio drawn
    from `ratio_range`, random crop of `crop_size` (`cat_max_ratio`), horizontal flip, photometric distortion,
    then padding to `crop_size` with `mean` (the normalisation's, so that the padding normalises to about 0, as
    mmsegmentation pads after normalising) and the mask with `IGNORE_INDEX`."""

    def __init__(self, scale, ratio_range, crop_size: int, mean, cat_max_ratio=0.75, photometric=True):
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.crop_size = crop_size
        self.fill = torch.tensor([round(255 * value) for value in mean], dtype=torch.uint8)
        self.cat_max_ratio = cat_max_ratio
        self.photometric = photometric

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        size = keep_ratio_size(*image.shape[-2:], self.scale, ratio)
        image = TF.resize(image, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        mask = TF.resize(mask[None], size, interpolation=v2.InterpolationMode.NEAREST)[0]
        top, left, height, width = random_crop_box(mask, self.crop_size, self.cat_max_ratio)
        image = image[:, top : top + height, left : left + width]
        mask = mask[top : top + height, left : left + width]
        if torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.photometric:
            image = photometric_distortion(image, **draw_photometric_distortion())
        pad_h, pad_w = self.crop_size - height, self.crop_size - width
        if pad_h or pad_w:
            canvas = self.fill[:, None, None].expand(3, self.crop_size, self.crop_size).clone()
            canvas[:, :height, :width] = image
            image = canvas
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return image.contiguous(), mask.contiguous()


class SegmentationEvalTransform:
    """Keep-ratio resize of the image to `scale`; the mask stays at its full resolution (predictions are
    resized to it, as mmseg does)."""

    def __init__(self, scale):
        self.scale = tuple(scale)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = keep_ratio_size(*image.shape[-2:], self.scale)
        if size != list(image.shape[-2:]):
            image = TF.resize(image, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        return image, mask


class SegmentationDataset(ImageDataset):
    """Image + mask pairs through a joint transform, with `ImageDataset`'s per-image seeds and bad-file skips."""

    def __init__(self, split: datasets.Dataset, transform, image_column="image", label_column="label", strict=False, seed=None):
        super().__init__(split, transform, image_column, label_column, strict, seed)
        self.split = self.split.cast_column(label_column, datasets.Image(decode=False))

    def example(self, row: dict) -> dict:
        image, mask = decode_rgb_tensor(row[self.image_column]), decode_mask(row[self.label_column])
        if image.shape[-2:] != mask.shape:
            raise BadImageError(record_path(row[self.label_column]), f"mask {tuple(mask.shape)} and image {tuple(image.shape[-2:])} differ in size")
        image, mask = self.transform(image, mask)
        return {"pixel_values": image, "labels": mask}


def collate_segmentation(examples: list[dict]) -> dict:
    """uint8 images and masks stacked; masks become int64 for the loss."""
    sizes = {tuple(example["pixel_values"].shape[-2:]) for example in examples}
    if len(sizes) > 1:
        raise ValueError(
            f"the images of one batch differ in size ({sorted(sizes)}): evaluate images of different sizes "
            f"with --per_device_eval_batch_size 1, or train on fixed-size crops."
        )
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.stack([example["labels"] for example in examples]).long(),
    }


def read_id2label(dataset_dir: str) -> dict[int, str] | None:
    path = Path(dataset_dir) / ID2LABEL_FILE
    if not path.is_file():
        return None
    return {int(index): name for index, name in json.loads(path.read_text()).items()}


# --- inference and metrics -----------------------------------------------------------------------


@torch.no_grad()
def slide_inference(model, pixel_values: torch.Tensor, crop_size: int, stride: int) -> torch.Tensor:
    """Logits (batch, classes, H, W) averaged over `crop_size` windows `stride` apart (mmseg's "slide" mode);
    an image smaller than a window is padded at the bottom / right for the forward and cut back after."""
    _, _, height, width = pixel_values.shape
    pad_h, pad_w = max(crop_size - height, 0), max(crop_size - width, 0)
    if pad_h or pad_w:
        pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
    padded_h, padded_w = pixel_values.shape[-2:]
    logits, counts = None, torch.zeros(padded_h, padded_w, device=pixel_values.device)
    for row in range(math.ceil(max(padded_h - crop_size, 0) / stride) + 1):
        for col in range(math.ceil(max(padded_w - crop_size, 0) / stride) + 1):
            bottom, right = min(row * stride + crop_size, padded_h), min(col * stride + crop_size, padded_w)
            top, left = bottom - crop_size, right - crop_size
            window = model(pixel_values[:, :, top:bottom, left:right]).logits.float()
            if logits is None:
                logits = window.new_zeros(window.shape[0], window.shape[1], padded_h, padded_w)
            logits[:, :, top:bottom, left:right] += window
            counts[top:bottom, left:right] += 1
    return (logits / counts)[:, :, :height, :width]


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) int64 counts, rows the true class and columns the predicted one, over the
    pixels not labelled `IGNORE_INDEX`."""
    valid = labels != IGNORE_INDEX
    labels, predictions = labels[valid].long(), predictions[valid].long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(
            f"label {int(labels.max() if labels.max() >= num_labels else labels.min())} is outside 0..{num_labels - 1} "
            f"(and is not the ignore index {IGNORE_INDEX}): the model's num_labels does not match the dataset's classes."
        )
    counts = torch.bincount(labels * num_labels + predictions, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def segmentation_metrics(confusion: torch.Tensor, id2label: dict[int, str] | None = None) -> dict[str, float]:
    """`mean_iou` and `mean_accuracy` over the classes that occur (in the labels or the predictions; an absent
    class has no IoU and is left out, as in mmseg), `pixel_accuracy` over all labelled pixels, and
    `iou_<class>` for each class that occurs."""
    confusion = confusion.double()
    intersection = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = intersection / union  # NaN where the class occurs nowhere
    labelled = confusion.sum(1)
    accuracy = intersection / labelled
    metrics = {
        "mean_iou": float(iou.nanmean()),
        "mean_accuracy": float(accuracy.nanmean()),
        "pixel_accuracy": float(intersection.sum() / confusion.sum()),
    }
    for index, value in enumerate(iou.tolist()):
        if not math.isnan(value):
            metrics[f"iou_{id2label[index] if id2label else index}"] = value
    return metrics


class SegmentationTrainer(NepaTrainer):
    """mmsegmentation's layer-wise lr decay over the backbone's blocks (block i of L at decay**(L-i), the embeddings
    at decay**(L+1); decoder, auxiliary head, neck and final norm at the full lr), and an
    evaluation that slides `crop_size` windows over each validation image and accumulates one confusion
    matrix over the split, gathered across processes: no logits are kept beyond the batch at hand."""

    def __init__(self, *args, layer_decay: float, crop_size: int, eval_stride: int, **kwargs):
        self.layer_decay = layer_decay
        self.crop_size = crop_size
        self.eval_stride = eval_stride
        super().__init__(*args, **kwargs)
        # UperNet's loss is a mean over the batch's pixels, but its forward takes **kwargs, which makes the Trainer
        # believe it normalises by `num_items_in_batch` itself and skip the division by the accumulation steps.
        self.model_accepts_loss_kwargs = False

    def save_beside_model(self, folder: str) -> None:
        super().save_beside_model(folder)
        save_model_code(folder)  # UperNet's save_pretrained does not copy its backbone's code

    def parameter_groups(self, model):
        num_layers = model.config.backbone_config.num_hidden_layers
        return layer_decay_param_groups(
            model, self.args.learning_rate, self.args.weight_decay, self.layer_decay, None, num_layers, decay_last_layer=True
        )

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        model = self.model
        model.eval()
        num_labels = model.config.num_labels
        confusion = torch.zeros(num_labels, num_labels, dtype=torch.int64, device=self.args.device)
        samples = 0
        for inputs in dataloader:
            inputs = self.prepare_batch(inputs)  # the prepared dataloader has put the batch on the device
            # accelerate casts the forward only of a model it has prepared for training: evaluation alone would run in
            # fp32 under --bf16 / --fp16, and evaluation after training in the mixed precision.
            with torch.no_grad(), self.accelerator.autocast():
                logits = slide_inference(model, inputs["pixel_values"], self.crop_size, self.eval_stride)
            labels = inputs["labels"]
            if logits.shape[-2:] != labels.shape[-2:]:
                logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            per_image = torch.stack([confusion_matrix(p, l, num_labels) for p, l in zip(logits.argmax(1), labels)])
            # Every process receives every image's matrix, and the images repeated to give all processes a last
            # batch of equal size are dropped: each image is counted once, whatever the split's size.
            per_image = self.accelerator.gather_for_metrics(per_image)
            confusion += per_image.sum(0)
            samples += len(per_image)
        metrics = segmentation_metrics(confusion.cpu(), model.config.id2label)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=samples)
