"""Semantic segmentation: the ViT-NEPA backbone under UperNet, the confusion-matrix metrics, the
Fashion-MNIST canvases, and the training / evaluation entry points. Tiny models, CPU, fp32."""

import gzip
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from safetensors.torch import load_file
from helpers import COMMON, REPO, fashion_mnist_canvases, save_processor, small_fashion_mnist, tiny_config
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from models.vit_nepa import ViTNepaBackbone, ViTNepaConfig, ViTNepaForImageClassification, ViTNepaForPreTraining
from models.vit_nepa.configuration_vit_nepa import default_out_indices
import download_dataset
import train_segmentation
from nepa.args import DataArguments, parse_arguments
from nepa.segmentation import (
    SegmentationDataset,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    confusion_matrix,
    hsv_to_rgb,
    photometric_distortion,
    read_id2label,
    rgb_to_hsv,
    segmentation_metrics,
    slide_inference,
)


def released_style_config(**overrides) -> ViTNepaConfig:
    """A tiny model in the released folders' format: patch 14, QK-norm with a learned weight, bidirectional."""
    values = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=56,
        patch_size=14, qk_norm=True, qk_norm_affine=True, is_causal=False, add_pooling_layer=True,
    )  # fmt: skip
    values.update(overrides)
    return ViTNepaConfig(**values)


def pixels(batch=2, height=32, width=32, seed=0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def upernet(backbone_config: ViTNepaConfig, num_labels=5, seed=0) -> UperNetForSemanticSegmentation:
    torch.manual_seed(seed)
    config = UperNetConfig(
        backbone_config=backbone_config, num_labels=num_labels, hidden_size=16, auxiliary_channels=16
    )
    return UperNetForSemanticSegmentation(config)


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------


def test_default_blocks_are_mae_and_beit_choice():
    assert ViTNepaConfig(num_hidden_layers=12).out_indices == [4, 6, 8, 12]
    assert ViTNepaConfig(num_hidden_layers=24).out_indices == [8, 12, 16, 24]
    assert ViTNepaConfig(num_hidden_layers=12).out_features == ["stage4", "stage6", "stage8", "stage12"]
    for depth in range(4, 40):
        blocks = default_out_indices(depth)
        assert len(set(blocks)) == 4 and blocks == sorted(blocks) and blocks[0] >= 1 and blocks[-1] == depth


@pytest.mark.parametrize("checkpoint_class", [ViTNepaForPreTraining, ViTNepaForImageClassification])
def test_backbone_loads_every_encoder_tensor(checkpoint_class, tmp_path):
    config = released_style_config(is_causal=checkpoint_class is ViTNepaForPreTraining, num_labels=7)
    torch.manual_seed(0)
    checkpoint = checkpoint_class(config)
    checkpoint.save_pretrained(tmp_path)
    backbone, info = ViTNepaBackbone.from_pretrained(tmp_path, is_causal=False, output_loading_info=True)
    encoder_keys = {f"vit_nepa.{name}" for name in checkpoint.vit_nepa.state_dict()}
    assert not encoder_keys & set(info["missing_keys"])
    assert all(key.startswith("neck.") for key in info["missing_keys"]), info["missing_keys"]
    assert set(info["unexpected_keys"]) <= {"fc_norm.weight", "fc_norm.bias", "classifier.weight", "classifier.bias"}
    loaded = backbone.state_dict()
    for name, tensor in checkpoint.state_dict().items():
        if name.startswith("vit_nepa."):
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    assert not backbone.config.is_causal


def test_block_maps_at_224_px_are_the_encoders_hidden_states():
    config = released_style_config(image_size=224)
    torch.manual_seed(0)
    encoder = ViTNepaForPreTraining(config).vit_nepa.eval()
    backbone = ViTNepaBackbone(config).eval()
    backbone.vit_nepa.load_state_dict(encoder.state_dict())
    images = pixels(1, 224, 224)
    with torch.no_grad():
        maps, _ = backbone.block_feature_maps(images)
        reference = encoder(images, output_hidden_states=True)
    assert [tuple(m.shape) for m in maps] == [(1, 32, 16, 16)] * 4
    for block, feature_map in zip(config.out_indices, maps):
        tokens = encoder.layernorm(reference.hidden_states[block][:, 1:])  # row-major patches, CLS dropped
        torch.testing.assert_close(feature_map.flatten(2).transpose(1, 2), tokens, rtol=0, atol=0)
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), reference.last_hidden_state[:, 1:], rtol=0, atol=0)


@pytest.mark.parametrize("patch_size, height, width", [(4, 32, 48), (14, 56, 84), (14, 504, 504)])
def test_pyramid_shapes(patch_size, height, width):
    config = released_style_config(patch_size=patch_size, image_size=56 if patch_size == 14 else 32)
    backbone = AutoBackbone.from_config(config).eval()
    assert isinstance(backbone, ViTNepaBackbone) and backbone.channels == [32] * 4
    with torch.no_grad():
        maps = backbone(pixels(1, height, width)).feature_maps
    rows, cols = height // patch_size, width // patch_size
    expected = [(4 * rows, 4 * cols), (2 * rows, 2 * cols), (rows, cols), (rows // 2, cols // 2)]
    assert [tuple(m.shape[-2:]) for m in maps] == expected
    assert all(m.shape[:2] == (1, 32) for m in maps)


def test_stages_name_blocks_one_based():
    config = released_style_config(num_hidden_layers=6, out_indices=[1, 2, 4, 6])
    assert config.stage_names == ["stem"] + [f"stage{i}" for i in range(1, 7)]
    assert config.out_features == ["stage1", "stage2", "stage4", "stage6"]
    torch.manual_seed(0)
    backbone = ViTNepaBackbone(config).eval()
    images = pixels(1, 28, 28)
    with torch.no_grad():
        maps, _ = backbone.block_feature_maps(images)
        hidden = backbone.vit_nepa(images, output_hidden_states=True).hidden_states
        after_block_4 = backbone.vit_nepa.layernorm(hidden[4][:, 1:])
    assert len(hidden) == 7  # embeddings + 6 blocks
    torch.testing.assert_close(maps[2].flatten(2).transpose(1, 2), after_block_4, rtol=0, atol=0)
    by_features = ViTNepaConfig.from_dict({**config.to_dict(), "out_indices": None, "out_features": ["stage1", "stage2", "stage4", "stage6"]})
    assert by_features.out_indices == [1, 2, 4, 6]


def test_backbone_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="4 blocks.*out_indices is \\[2\\]"):
        ViTNepaBackbone(tiny_config())  # 2 blocks: the default is the last one alone
    with pytest.raises(ValueError, match="out_indices must be valid"):
        released_style_config(out_indices=[1, 2, 3, 9])
    backbone = ViTNepaBackbone(released_style_config())
    with pytest.raises(ValueError, match="50x56 is not a multiple of patch_size 14.*resize or crop"):
        backbone(pixels(1, 50, 56))


# --------------------------------------------------------------------------------------------
# UperNet on top
# --------------------------------------------------------------------------------------------


def test_upernet_forward_backward_ignores_ignore_pixels():
    model = upernet(released_style_config(patch_size=4, image_size=32)).train()
    images = pixels(2, 32, 48)
    labels = torch.randint(0, 5, (2, 32, 48), generator=torch.Generator().manual_seed(1))
    labels[:, :8] = 255
    outputs = model(images, labels=labels)
    assert outputs.logits.shape == (2, 5, 32, 48)
    outputs.loss.backward()
    encoder_grads = [p.grad for n, p in model.backbone.named_parameters() if n.startswith("vit_nepa.encoder.")]
    assert all(g is not None and torch.isfinite(g).all() for g in encoder_grads)
    assert any(g.abs().sum() > 0 for g in encoder_grads)

    # The loss sees only labelled pixels: changing the ignored pixels' logits changes nothing.
    model.eval()
    with torch.no_grad():
        logits = model(images).logits
    changed = logits.clone()
    changed[:, :, :8] = torch.randn_like(changed[:, :, :8]) * 100
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(torch.nn.functional.cross_entropy(changed, labels, ignore_index=255), loss)


def test_upernet_save_load_round_trip(tmp_path):
    model = upernet(released_style_config(patch_size=4, image_size=32)).eval()
    model.save_pretrained(tmp_path)
    loaded, info = UperNetForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert isinstance(loaded.backbone, ViTNepaBackbone)
    assert loaded.backbone.config.out_indices == model.backbone.config.out_indices
    images = pixels(1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images).logits, model(images).logits, rtol=0, atol=0)


# mmsegmentation's MAE / BEiT layer decay for a 3-block backbone at lr 1 and decay 0.5: block i of L = 3 gets
# 0.5^(3-i), the embeddings (patch projection, cls token) 0.5^4, everything above the blocks 1.
HAND_WORKED_SEGMENTATION_LR = {
    "backbone.vit_nepa.embeddings.": 0.0625,
    "backbone.vit_nepa.encoder.layer.0.": 0.125,
    "backbone.vit_nepa.encoder.layer.1.": 0.25,
    "backbone.vit_nepa.encoder.layer.2.": 0.5,
    "backbone.vit_nepa.layernorm.": 1.0,
    "backbone.neck.": 1.0,
    "decode_head.": 1.0,
    "auxiliary_head.": 1.0,
}


def test_segmentation_layer_decay_is_mmsegmentations(tmp_path):
    from nepa.args import NepaTrainingArguments
    from nepa.data import BatchNormalize
    from nepa.segmentation import SegmentationTrainer

    model = upernet(released_style_config(num_hidden_layers=3, patch_size=4, image_size=32, out_indices=[0, 1, 2, 3]))
    (args,) = parse_arguments((NepaTrainingArguments,), ["--output_dir", str(tmp_path), "--use_cpu", "True",
                                                         "--learning_rate", "1", "--report_to", "none"])  # fmt: skip
    trainer = SegmentationTrainer(
        model=model, args=args, normalize=BatchNormalize([0.5] * 3, [0.5] * 3), layer_decay=0.5, crop_size=32, eval_stride=32
    )
    optimizer = trainer.create_optimizer()
    names = {id(param): name for name, param in model.named_parameters()}
    placed = [(names[id(param)], group["lr"]) for group in optimizer.param_groups for param in group["params"]]
    assert sorted(name for name, _ in placed) == sorted(names.values())
    for name, lr in placed:
        (prefix,) = [prefix for prefix in HAND_WORKED_SEGMENTATION_LR if name.startswith(prefix)]
        assert lr == HAND_WORKED_SEGMENTATION_LR[prefix], name


# --------------------------------------------------------------------------------------------
# Metrics from a confusion matrix
# --------------------------------------------------------------------------------------------


def test_confusion_matrix_and_metrics_worked_by_hand():
    labels = torch.tensor([[0, 0, 1], [1, 2, 255]])
    predictions = torch.tensor([[0, 1, 1], [1, 2, 0]])  # the last pixel is ignored whatever it predicts
    confusion = confusion_matrix(predictions, labels, num_labels=3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]  # rows: true class, columns: predicted
    metrics = segmentation_metrics(confusion, {0: "sky", 1: "road", 2: "car"})
    # IoU = diagonal / (row + column - diagonal): sky 1/(2+1-1), road 2/(2+3-2), car 1/(1+1-1)
    assert metrics["iou_sky"] == pytest.approx(1 / 2)
    assert metrics["iou_road"] == pytest.approx(2 / 3)
    assert metrics["iou_car"] == pytest.approx(1.0)
    assert metrics["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(4 / 5)
    assert metrics["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 1) / 3)


def test_classes_absent_from_labels_and_predictions_are_left_out():
    labels = torch.zeros(1, 2, dtype=torch.long)
    predictions = torch.tensor([[0, 3]])
    metrics = segmentation_metrics(confusion_matrix(predictions, labels, num_labels=4))
    # class 0: 1 / (2 + 1 - 1); class 3 predicted but never true: IoU 0, counted; classes 1 and 2: nowhere
    assert metrics["mean_iou"] == pytest.approx((1 / 2 + 0) / 2)
    assert set(metrics) == {"mean_iou", "mean_accuracy", "pixel_accuracy", "iou_0", "iou_3"}
    assert metrics["mean_accuracy"] == pytest.approx(1 / 2)  # class 3 has no true pixel: no accuracy


def test_confusion_matrix_accumulates_over_batches():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (6, 8, 8), generator=generator)
    labels[labels == 4] = 255
    predictions = torch.randint(0, 4, (6, 8, 8), generator=generator)
    whole = confusion_matrix(predictions, labels, 4)
    parts = sum(confusion_matrix(p, l, 4) for p, l in zip(predictions.split(2), labels.split(2)))
    assert torch.equal(whole, parts)
    assert int(whole.sum()) == int((labels != 255).sum())


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match="label 7 is outside 0..3.*num_labels"):
        confusion_matrix(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 7]]), num_labels=4)


# --------------------------------------------------------------------------------------------
# Datasets: Fashion-MNIST canvases, ADE20K from its archive, the joint transforms
# --------------------------------------------------------------------------------------------


def write_idx(path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path):
    """Fashion-MNIST's file layout with 28x28 squares: training items are grey 100, test items grey 200."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix, grey, count in [("train", 100, 12), ("t10k", 200, 6)]:
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        images[:, 4:24, 6:22] = grey
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return folder


def test_canvases_are_seeded_by_their_index(fake_fashion_mnist):
    small, id2label = download_dataset.build_fashion_mnist_seg(fake_fashion_mnist, canvas_size=56, max_per_split=3)
    large, _ = download_dataset.build_fashion_mnist_seg(fake_fashion_mnist, canvas_size=56, max_per_split=5)
    for split in ("train", "validation"):
        for index in range(3):
            assert small[split][index]["image"].tobytes() == large[split][index]["image"].tobytes()
            assert small[split][index]["label"].tobytes() == large[split][index]["label"].tobytes()
    assert small["train"][0]["label"].tobytes() != small["train"][1]["label"].tobytes()
    assert id2label[0] == "background" and id2label[1] == "T-shirt/top" and len(id2label) == 11


def test_canvas_masks_are_item_class_plus_one_on_foreground(fake_fashion_mnist):
    dataset, _ = download_dataset.build_fashion_mnist_seg(fake_fashion_mnist, canvas_size=64, max_per_split=4)
    for split, grey in [("train", 100), ("validation", 200)]:  # training canvases from training items only
        for row in dataset[split]:
            image, mask = np.array(row["image"]), np.array(row["label"])
            assert image.shape == mask.shape == (64, 64)
            assert set(np.unique(image)) <= {0, grey}
            assert np.array_equal(mask > 0, image > 0)
            assert mask.max() <= 10
            items = len(np.unique(mask)) - 1
            assert 1 <= items <= 4


def make_ade20k_archive(path: Path) -> Path:
    def png(array):
        buffer = io.BytesIO()
        PILImage.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    def jpg(array):
        buffer = io.BytesIO()
        PILImage.fromarray(array.astype(np.uint8)).save(buffer, format="JPEG")
        return buffer.getvalue()

    info = "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n2\t0.1\t1\t1\tbuilding;edifice\n3\t0.1\t1\t1\tsky\n"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ADEChallengeData2016/objectInfo150.txt", info)
        for split, count in [("training", 2), ("validation", 1)]:
            for index in range(count):
                name = f"ADE_{split[:5]}_{index:08d}"
                mask = np.array([[0, 1, 2, 3]] * 4)
                archive.writestr(f"ADEChallengeData2016/images/{split}/{name}.jpg", jpg(np.full((4, 4, 3), 90)))
                archive.writestr(f"ADEChallengeData2016/annotations/{split}/{name}.png", png(mask))
    return path


def test_ade20k_is_built_from_the_archive_with_label_zero_ignored(tmp_path):
    archive = make_ade20k_archive(tmp_path / "ADEChallengeData2016.zip")
    output = download_dataset.main(["--dataset", "ade20k", "--archive", str(archive), "--output_dir", str(tmp_path / "ade")])
    dataset = datasets.load_from_disk(str(output))
    assert {split: len(dataset[split]) for split in dataset} == {"train": 2, "validation": 1}
    assert np.array(dataset["validation"][0]["label"]).tolist() == [[255, 0, 1, 2]] * 4
    assert read_id2label(str(output)) == {0: "wall", 1: "building", 2: "sky"}


def test_ade20k_offline_says_what_to_download(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(SystemExit, match="(?s)Could not download ADE20K.*ADEChallengeData2016.zip.*--archive"):
        download_dataset.main(["--dataset", "ade20k", "--output_dir", str(tmp_path / "ade")])
    assert not list(tmp_path.glob("*.partial"))


def mask_coded_dataset(size=20) -> datasets.Dataset:
    """One image whose red channel is 20 x its mask, so any misalignment of the two shows."""
    mask = (np.arange(size)[None, :] // 4 + np.arange(size)[:, None] // 5).astype(np.uint8) % 5
    image = np.stack([mask * 20, mask * 0, mask * 0], axis=-1).astype(np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": [PILImage.fromarray(image)], "label": [PILImage.fromarray(mask)]}, features=features)


MEAN = (0.485, 0.456, 0.406)  # ImageNet's: the padding is (124, 116, 104)


def test_train_transform_keeps_image_and_mask_aligned_and_pads_with_mean_and_ignore():
    """The padding is the normalisation's mean (about 0 once normalised, as mmsegmentation pads after normalising),
    and the mask's is the ignore index."""
    transform = SegmentationTrainTransform(scale=(20, 20), ratio_range=(1.0, 1.0), crop_size=24, mean=MEAN, photometric=False)
    dataset = SegmentationDataset(mask_coded_dataset(), transform, seed=0)
    flips = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        example = dataset[0]
        image, mask = example["pixel_values"], example["labels"]
        assert image.shape == (3, 24, 24) and mask.shape == (24, 24) and mask.dtype == torch.uint8
        assert (mask[20:] == 255).all() and (mask[:, 20:] == 255).all()
        for padding in (image[:, 20:], image[:, :, 20:]):
            assert torch.equal(padding, torch.tensor([124, 116, 104], dtype=torch.uint8)[:, None, None].expand_as(padding))
        labelled = mask != 255
        assert torch.equal(image[0][labelled], mask[labelled] * 20)
        flips.add(int(mask[0, 0]))
    assert len(flips) == 2  # both orientations occurred
    again = SegmentationDataset(mask_coded_dataset(), transform, seed=0)
    again.set_epoch(5)
    assert torch.equal(again[0]["labels"], mask)  # the draw depends on (seed, epoch, index) only


def test_train_transform_random_resize_and_crop():
    transform = SegmentationTrainTransform(scale=(64, 16), ratio_range=(0.5, 2.0), crop_size=12, mean=MEAN)
    sizes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        image, mask = transform(torch.zeros(3, 30, 40, dtype=torch.uint8), torch.ones(30, 40, dtype=torch.uint8))
        assert image.shape == (3, 12, 12) and mask.shape == (12, 12)
        sizes.add(int((mask == 1).sum()))
    assert len(sizes) > 1  # some crops fell off a small resized image and were padded with ignore


def test_hsv_conversion_is_colorsys():
    import colorsys

    pixels = torch.rand(3, 6, 7, generator=torch.Generator().manual_seed(0))
    pixels[:, 0, 0] = 0.5  # grey: no hue, no saturation
    pixels[:, 0, 1] = 0.0
    hsv = rgb_to_hsv(pixels)
    expected = torch.tensor([colorsys.rgb_to_hsv(*pixels[:, i, j].tolist()) for i in range(6) for j in range(7)])
    torch.testing.assert_close(hsv.flatten(1).T, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(hsv_to_rgb(hsv), pixels, rtol=0, atol=1e-6)


def rgb(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)[:, None, None]


def test_photometric_distortion_worked_by_hand():
    """mmsegmentation's steps: brightness adds, contrast multiplies (before or after the rest), saturation scales
    HSV's S, hue turns by OpenCV units of 2 degrees."""
    def distort(image, **params):
        values = dict(brightness=None, contrast=None, saturation=None, hue=None, contrast_first=True) | params
        return photometric_distortion(image, **values).flatten().tolist()

    assert distort(rgb(100, 100, 100), brightness=32.0) == [132, 132, 132]
    assert distort(rgb(100, 100, 100), brightness=-32.0, contrast=0.5) == [34, 34, 34]  # (100 - 32) x 0.5
    assert distort(rgb(100, 100, 100), brightness=32.0, contrast=1.5, contrast_first=False) == [198, 198, 198]
    assert distort(rgb(200, 250, 10), brightness=32.0) == [232, 255, 42]  # clipped at 255
    assert distort(rgb(255, 0, 0), hue=18) == [255, 153, 0]  # red turned by 36 degrees: 0.6 of the way to yellow
    assert distort(rgb(255, 0, 0), hue=-18) == [255, 0, 153]
    assert distort(rgb(200, 100, 100), saturation=0.5) == [200, 150, 150]  # S 0.5 -> 0.25 at the same V


def test_train_transform_turns_hue_by_up_to_36_degrees_and_adds_brightness():
    """Through the whole training transform: dark red keeps hue 0 under brightness, contrast (never clipped below
    255 / 1.5) and saturation, so its hue is the drawn turn, -36..34 degrees (mmsegmentation's -18..17 OpenCV units,
    +-1 for the rounding to uint8); grey 100 moves by the additive +-32 and the x0.5-1.5 contrast."""
    red = SegmentationTrainTransform(scale=(4, 4), ratio_range=(1.0, 1.0), crop_size=4, mean=MEAN)
    turns, greys = set(), set()
    for seed in range(300):
        torch.manual_seed(seed)
        image, _ = red(rgb(100, 0, 0).expand(3, 4, 4).contiguous(), torch.zeros(4, 4, dtype=torch.uint8))
        hue = float(rgb_to_hsv(image[:, 0, 0].float()[:, None, None] / 255)[0]) * 360
        turns.add(round(hue if hue < 180 else hue - 360))
        torch.manual_seed(seed)
        image, _ = red(rgb(100, 100, 100).expand(3, 4, 4).contiguous(), torch.zeros(4, 4, dtype=torch.uint8))
        greys.add(int(image[0, 0, 0]))
    assert min(turns) <= -30 and max(turns) >= 30 and -37 <= min(turns) and max(turns) <= 35, sorted(turns)
    assert 34 <= min(greys) and max(greys) <= 198 and any(abs(grey - 100) > 13 for grey in greys if 85 < grey < 115)


def test_eval_transform_resizes_the_image_keeping_the_full_resolution_mask():
    image, mask = SegmentationEvalTransform(scale=(2048, 512))(torch.zeros(3, 300, 400, dtype=torch.uint8), torch.zeros(300, 400, dtype=torch.uint8))
    assert image.shape == (3, 512, 683) and mask.shape == (300, 400)


def test_sliding_window_covers_the_image_and_averages_overlaps():
    class Echo(torch.nn.Module):
        """Logits = the window's own pixels: sliding windows must put them back in place."""

        def forward(self, pixel_values):
            return type("Output", (), {"logits": pixel_values[:, :2] * 1.0})()

    images = torch.randn(2, 3, 30, 47)
    torch.testing.assert_close(slide_inference(Echo(), images, crop_size=16, stride=10), images[:, :2])
    small = torch.randn(1, 3, 10, 12)  # smaller than a window: padded for the forward, cut back after
    torch.testing.assert_close(slide_inference(Echo(), small, crop_size=16, stride=10), small[:, :2])


# --------------------------------------------------------------------------------------------
# The entry point: train, save, resume, evaluate
# --------------------------------------------------------------------------------------------

# The tiny recipe's flags, by where they apply (a run refuses flags it would not use).
ENCODER_FLAGS = ["--decoder_hidden_size", "32", "--auxiliary_channels", "32"]  # building from an encoder
TRAIN_FLAGS = ["--train_scale", "56", "56", "--ratio_range", "1", "1", "--photometric", "False"]
EVAL_FLAGS = ["--eval_scale", "56", "56", "--eval_stride", "56"]
SEG_FLAGS = ["--crop_size", "56", *ENCODER_FLAGS, *TRAIN_FLAGS, *EVAL_FLAGS, "--save_strategy", "no", *COMMON]


@pytest.fixture(scope="module")
def eight_canvases(tmp_path_factory) -> Path:
    """8 real Fashion-MNIST canvases, as both the training and the validation split (to overfit them)."""
    return fashion_mnist_canvases(tmp_path_factory.mktemp("canvases"), 8)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    config = ViTNepaConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=28,
        patch_size=4, qk_norm=True, layerscale_value=0.1, out_indices=[0, 1, 2, 3],
    )  # fmt: skip
    ViTNepaForPreTraining(config).save_pretrained(folder)
    save_processor(folder, 28)
    return folder


def test_tiny_model_overfits_eight_canvases(eight_canvases, tiny_encoder, tmp_path):
    metrics = train_segmentation.main([
        "--model_name_or_path", str(tiny_encoder), "--dataset_name", str(eight_canvases), "--load_from_disk", "True",
        "--output_dir", str(tmp_path / "seg"), "--do_train", "--do_eval", "--max_steps", "150",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--llrd", "1.0", "--warmup_steps", "10",
        "--lr_scheduler_type", "constant_with_warmup",
        "--weight_decay", "0.0", "--drop_path", "0.0", "--logging_steps", "50", "--seed", "0", *SEG_FLAGS,
    ])  # fmt: skip
    assert metrics["eval_mean_iou"] > 0.9, metrics


def segmentation_args(model: Path, dataset: Path, output_dir: Path, *flags: str) -> list[str]:
    """The tiny recipe for `model` (an encoder or a saved segmentation folder) with the flags that `flags`' run uses."""
    recipe = ["--crop_size", "56", "--save_strategy", "no", *COMMON]
    recipe += ENCODER_FLAGS if train_segmentation.folder_model_type(model) != "upernet" else []
    recipe += TRAIN_FLAGS if "--do_train" in flags else []
    recipe += EVAL_FLAGS if "--do_eval" in flags or "--eval_strategy" in flags else []
    return [
        "--model_name_or_path", str(model), "--dataset_name", str(dataset), "--load_from_disk", "True",
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "0", *recipe, *flags,
    ]  # fmt: skip


def test_resumed_run_ends_where_the_uninterrupted_one_does(eight_canvases, tiny_encoder, tmp_path):
    flags = ("--do_train", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--warmup_steps", "1")
    train_segmentation.main(segmentation_args(tiny_encoder, eight_canvases, tmp_path / "whole", *flags))
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train_segmentation.main(segmentation_args(tiny_encoder, eight_canvases, tmp_path / "resumed", *flags))
    whole_history = json.loads((tmp_path / "whole" / "trainer_state.json").read_text())["log_history"]
    history = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]  # steps 1-2 from the checkpoint
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses == pytest.approx([entry["loss"] for entry in whole_history if "loss" in entry], abs=1e-5)
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_accumulation_averages_the_loss(eight_canvases, tiny_encoder, tmp_path, caplog):
    """Two accumulated half batches log the mean of their losses (not the sum, which UperNet's **kwargs invites);
    the start-up warns that BatchNorm sees 2 images."""
    with caplog.at_level(logging.WARNING, logger="train_segmentation"):
        train_segmentation.main(segmentation_args(
            tiny_encoder, eight_canvases, tmp_path / "accumulated", "--do_train", "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "0",
        ))  # fmt: skip
    history = json.loads((tmp_path / "accumulated" / "trainer_state.json").read_text())["log_history"]
    assert history[0]["loss"] < 3.5  # one half batch's loss is about ln(11) + 0.4 ln(11) = 3.36 at the start
    assert "BatchNorm in the UperNet heads normalises over 2 images" in caplog.text


def test_skipped_nonfinite_step_leaves_no_nan_in_batchnorm_and_its_count_survives_a_resume(
    eight_canvases, tiny_encoder, tmp_path, monkeypatch
):
    """--skip_nonfinite_loss True with NaN pixels in step 1: the step's forward has put NaN in the heads' BatchNorm
    running statistics, which the skip restores, so no NaN reaches the checkpoints, the saved model or evaluation;
    a run resumed from checkpoint 2 goes on counting that skipped step."""
    forward, poisoned = UperNetForSemanticSegmentation.forward, {"armed": True}

    def nan_pixels_in_first_step(self, pixel_values=None, *args, **kwargs):
        if self.training and poisoned.pop("armed", False):
            pixel_values = pixel_values * float("nan")
        return forward(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(UperNetForSemanticSegmentation, "forward", nan_pixels_in_first_step)
    flags = ("--do_train", "--do_eval", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
             "--skip_nonfinite_loss", "True", "--eval_strategy", "steps", "--eval_steps", "2")  # fmt: skip
    metrics = train_segmentation.main(segmentation_args(tiny_encoder, eight_canvases, tmp_path / "whole", *flags))
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train_segmentation.main(segmentation_args(tiny_encoder, eight_canvases, tmp_path / "resumed", *flags))
    for weights in ("checkpoint-2/model.safetensors", "model.safetensors"):
        for name, tensor in load_file(tmp_path / "whole" / weights).items():
            assert torch.isfinite(tensor.float()).all(), f"{weights}: {name}"
    assert np.isfinite(metrics["eval_pixel_accuracy"]) and metrics["eval_pixel_accuracy"] > 0
    for run in ("whole", "resumed"):
        history = json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"]
        skipped = {entry["step"]: entry.get("skipped_steps", 0) for entry in history if "loss" in entry}
        assert skipped == {1: 1, 2: 1, 3: 1, 4: 1}, run  # the resumed run logged steps 3 and 4; 1 and 2 are its checkpoint's


def test_bf16_runs_training_evaluation_and_evaluation_alone_in_bf16(eight_canvases, tiny_encoder, tmp_path, monkeypatch):
    """--bf16: the decode head computes in bf16 in training, in the evaluation after training and in an evaluation
    of the saved folder alone, which therefore gives the training run's final metrics."""
    from transformers.models.upernet.modeling_upernet import UperNetHead

    dtypes, head_forward = {}, UperNetHead.forward

    def recording_forward(self, *args, **kwargs):
        logits = head_forward(self, *args, **kwargs)
        dtypes.setdefault((run, "train" if torch.is_grad_enabled() else "eval"), set()).add(logits.dtype)
        return logits

    monkeypatch.setattr(UperNetHead, "forward", recording_forward)
    run = "trained"
    trained = train_segmentation.main(segmentation_args(
        tiny_encoder, eight_canvases, tmp_path / "bf16", "--do_train", "--do_eval", "--max_steps", "2", "--bf16", "True",
    ))  # fmt: skip
    run = "evaluated"
    evaluated = train_segmentation.main(
        segmentation_args(tmp_path / "bf16", eight_canvases, tmp_path / "eval", "--do_eval", "--bf16", "True")
    )
    assert dtypes == {(run, kind): {torch.bfloat16} for run, kind in [("trained", "train"), ("trained", "eval"), ("evaluated", "eval")]}
    for key in ("eval_mean_iou", "eval_pixel_accuracy", "eval_mean_accuracy"):
        assert evaluated[key] == trained[key], key


def test_saved_model_is_evaluated_with_do_eval_alone(eight_canvases, tiny_encoder, tmp_path):
    """The saved weights and, with --use_ema True, the saved EMA give the metrics of the training run's own final
    evaluation; a folder without model_ema.safetensors gets no eval_ema_* metrics."""
    ema = ("--use_ema", "True", "--ema_decay", "0.5")
    trained = train_segmentation.main(
        segmentation_args(tiny_encoder, eight_canvases, tmp_path / "seg", "--do_train", "--do_eval", "--max_steps", "2", *ema)
    )
    evaluated = train_segmentation.main(segmentation_args(tmp_path / "seg", eight_canvases, tmp_path / "eval", "--do_eval", *ema[:2]))
    (tmp_path / "seg" / "model_ema.safetensors").unlink()
    without_ema = train_segmentation.main(segmentation_args(tmp_path / "seg", eight_canvases, tmp_path / "eval2", "--do_eval", *ema[:2]))
    for key in ("eval_mean_iou", "eval_pixel_accuracy", "eval_ema_mean_iou", "eval_ema_pixel_accuracy"):
        assert evaluated[key] == trained[key], key
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["eval_mean_iou"] == trained["eval_mean_iou"]
    assert without_ema["eval_mean_iou"] == trained["eval_mean_iou"]
    assert not [key for key in without_ema if key.startswith("eval_ema_")]


def test_two_processes_count_each_validation_image_once(eight_canvases, tiny_encoder, tmp_path):
    """5 images over 2 processes: one process's last batch repeats an image to even the batches, and the
    gathered confusion matrix drops it, so the metrics are those of one process."""
    train_segmentation.main(segmentation_args(tiny_encoder, eight_canvases, tmp_path / "seg", "--do_train", "--max_steps", "2"))
    five = tmp_path / "five"
    split = datasets.load_from_disk(str(eight_canvases))["train"].select(range(5))
    datasets.DatasetDict(train=split, validation=split).save_to_disk(str(five))
    shutil.copy(eight_canvases / "id2label.json", five / "id2label.json")
    results = {}
    for processes in (1, 2):
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if processes > 1 else [])
        argv = segmentation_args(tmp_path / "seg", five, tmp_path / f"eval{processes}", "--do_eval", "--per_device_eval_batch_size", "1")
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        run = subprocess.run([*launcher, str(REPO / "train_segmentation.py"), *argv], cwd=REPO, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        results[processes] = json.loads((tmp_path / f"eval{processes}" / "eval_results.json").read_text())
    for metrics in results.values():
        assert round(metrics["eval_runtime"] * metrics["eval_samples_per_second"]) == 5
    per_class = {name: value for name, value in results[1].items() if name.startswith(("eval_iou_", "eval_mean", "eval_pixel"))}
    assert per_class == {name: results[2][name] for name in per_class}


def test_entry_point_refuses_bad_sizes_encoders_to_evaluate_and_classification_flags(eight_canvases, tiny_encoder, tmp_path):
    with pytest.raises(ValueError, match="--crop_size 50 is not a multiple of patch_size 4: use 48 or 52"):
        train_segmentation.main([*segmentation_args(tiny_encoder, eight_canvases, tmp_path / "a", "--do_train"), "--crop_size", "50"])
    with pytest.raises(ValueError, match="is an encoder, not a segmentation model"):
        train_segmentation.main(segmentation_args(tiny_encoder, eight_canvases, tmp_path / "b", "--do_eval"))
    for flag in (["--labels_per_class", "2"], ["--crop_scale", "0.5", "1"], ["--crop_ratio", "1", "1"], ["--images_in_memory", "True"]):
        with pytest.raises(ValueError, match=f"{flag[0]} is not used: segmentation.* leave it out"):
            train_segmentation.main([*segmentation_args(tiny_encoder, eight_canvases, tmp_path / "c", "--do_train"), *flag])


def test_a_saved_segmentation_folder_refuses_the_architecture_flags(eight_canvases, tiny_encoder, tmp_path):
    """--is_causal, --drop_path, --out_indices, --decoder_hidden_size and --auxiliary_* build a model from an encoder;
    a saved UperNet folder's config fixes them, so they are refused with it rather than ignored."""
    train_segmentation.main(segmentation_args(tiny_encoder, eight_canvases, tmp_path / "seg", "--do_train", "--max_steps", "1"))
    for flag in (["--is_causal", "True"], ["--drop_path", "0.3"], ["--out_indices", "1", "2"], ["--decoder_hidden_size", "64"],
                 ["--auxiliary_channels", "64"], ["--auxiliary_loss_weight", "1.0"]):  # fmt: skip
        with pytest.raises(ValueError, match=f"{flag[0]} is used only when building the model from an encoder folder"):
            train_segmentation.main([*segmentation_args(tmp_path / "seg", eight_canvases, tmp_path / "e", "--do_eval"), *flag])


@pytest.mark.parametrize("script, drop_path, decoder", [("nepa_b_ade20k.sh", 0.1, 768), ("nepa_l_ade20k.sh", 0.2, 1024)])
def test_ade20k_scripts_launch_the_recipe(tmp_path, script, drop_path, decoder):
    """The command a script launches on one GPU, recorded by a stand-in for Python, parses and carries the recipe."""
    stand_in, record = tmp_path / "python", tmp_path / "argv"
    stand_in.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\nprintf "%s\\n" "$@" > {record}\n')
    stand_in.chmod(0o755)
    (tmp_path / "encoder").mkdir()
    (tmp_path / "ade20k").mkdir()
    env = {
        **os.environ, "PYTHON": str(stand_in), "NPROC_PER_NODE": "1", "REPORT_TO": "none",
        "MODEL": str(tmp_path / "encoder"), "DATA_DIR": str(tmp_path / "ade20k"),
    }  # fmt: skip
    result = subprocess.run(["bash", str(REPO / "scripts/segmentation" / script), "--use_cpu", "True"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    assert argv[0] == "train_segmentation.py"
    args, data_args, training_args = parse_arguments(
        (train_segmentation.SegmentationArguments, DataArguments, train_segmentation.SegmentationTrainingArguments), argv[1:]
    )
    assert training_args.max_steps == 160_000 and training_args.warmup_steps == 1500
    assert not training_args.use_ema  # the MAE/BEiT recipe keeps no EMA
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 16
    assert training_args.learning_rate == 1e-4 and training_args.weight_decay == 0.05 and training_args.bf16
    assert training_args.lr_scheduler_type == "linear"
    architecture = train_segmentation.encoder_architecture(args)
    assert (args.llrd, architecture.drop_path, architecture.decoder_hidden_size, architecture.auxiliary_loss_weight) == (0.65, drop_path, decoder, 0.4)
    assert args.crop_size == 504 and args.crop_size % 14 == 0 and args.eval_stride == 336 and not architecture.is_causal
    assert args.train_scale == [2048, 512] and args.ratio_range == [0.5, 2.0] and args.photometric
    assert data_args.dataset_name == str(tmp_path / "ade20k") and training_args.per_device_eval_batch_size == 1
    assert "BatchNorm will normalise over 2 images (2 x 1 GPUs), not the recipe's 16" in result.stderr


def test_ade20k_script_without_data_says_how_to_build_it(tmp_path):
    (tmp_path / "encoder").mkdir()
    env = {**os.environ, "REPORT_TO": "none", "MODEL": str(tmp_path / "encoder"), "DATA_DIR": str(tmp_path / "missing")}
    result = subprocess.run(["bash", str(REPO / "scripts/segmentation/nepa_b_ade20k.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "download_dataset.py --dataset ade20k --archive" in result.stderr


@pytest.mark.slow
def test_segmentation_demo_runs_its_rows_side_by_side_and_a_second_run_reuses_them(tmp_path):
    fashion_mnist = small_fashion_mnist(tmp_path / "fashion-mnist")
    command = [
        sys.executable, "-m", "experiments.segmentation_demo", "--output_dir", str(tmp_path / "demo"),
        "--fashion_mnist", str(fashion_mnist), "--pretrain_steps", "2", "--steps", "2",
        "--train_canvases", "16", "--eval_canvases", "4", "--seeds", "0", "1", "--jobs", "2",
    ]  # fmt: skip
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "4 segmentation runs, 2 at a time" in first.stdout
    table = (tmp_path / "demo" / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| NEPA-pretrained |", "| random init |"))]
    assert len(rows) == 2 and all(row.count("±") == 2 and row.count(" / ") == 1 for row in rows)
    for run in ("seg-nepa-seed0", "seg-nepa-seed1", "seg-random-seed0", "seg-random-seed1"):
        assert 0 <= json.loads((tmp_path / "demo" / run / "eval_results.json").read_text())["eval_mean_iou"] <= 1
    assert json.loads((tmp_path / "demo" / "pretrain" / "config.json").read_text())["patch_size"] == 4

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "0 segmentation runs" in second.stdout and "==> NEPA pretraining" not in second.stdout
    assert (tmp_path / "demo" / "results.md").read_text().split("| stage |")[0] == table.split("| stage |")[0]
