"""What the tests share: tiny model configs and folders, and datasets built from local files only."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import datasets
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from safetensors.torch import load_file
from transformers import ViTImageProcessor

import download_dataset
from image_folder import make_image_folder
from models.vit_nepa import ViTNepaConfig

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16
# The flags every in-process training or evaluation run of the tests passes: CPU, no logging services, no workers.
COMMON = ["--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--disable_tqdm", "True"]


def tiny_config(**overrides) -> ViTNepaConfig:
    """A ViT-NEPA small enough for a unit test: 4x4 patches of 8 px, 2 layers, head_dim 8."""
    values = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        qk_norm=True,
        qk_norm_affine=True,
    )
    values.update(overrides)
    return ViTNepaConfig(**values)


def save_processor(folder: Path, size: int = IMAGE_SIZE) -> None:
    """A `size` x `size` resize with mean = std = 0.5, so that pixels map to [-1, 1]."""
    processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(folder)


def write_config_folder(folder: Path, **overrides) -> Path:
    """config.json + preprocessor_config.json of a 16 px, 4 px-patch, 2-layer ViT-NEPA (the --config_name input)."""
    tiny_config(**{"image_size": IMAGE_SIZE, "patch_size": 4, "qk_norm_affine": False, **overrides}).save_pretrained(folder)
    save_processor(folder)
    return Path(folder)


def build_image_dataset(root: Path, num_classes: int = 3, per_class: int = 8, val_per_class: int = 4) -> Path:
    """A download_dataset.py folder from a generated image folder: one mean colour per class."""
    source = make_image_folder(
        root / "images", num_classes=num_classes, per_class=per_class, val_per_class=val_per_class
    )
    return download_dataset.main(["--imagefolder", str(source), "--output_dir", str(root / "dataset")])


def build_reference_dataset(fixture_dir: Path, output_dir: Path) -> Path:
    """The fixture's input images as PNGs, labelled with the argmax of its expected logits, in both splits.

    Its pixel_values are normalised with mean = std = 0.5, so `(x * 0.5 + 0.5) * 255` recovers uint8 pixels;
    values outside [0, 255] are clipped (the fixture's inputs are Gaussian noise, so about a third are)."""
    expected = load_file(Path(fixture_dir) / "expected_io.safetensors")
    pixels = ((expected["pixel_values"] * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    labels = expected["logits"].argmax(dim=-1).tolist()
    num_classes = expected["logits"].shape[-1]
    features = Features({"image": Image(), "label": ClassLabel(names=[f"LABEL_{i}" for i in range(num_classes)])})
    images = [{"bytes": download_dataset.png_bytes(image.permute(1, 2, 0).numpy()), "path": None} for image in pixels]
    split = Dataset.from_dict({"image": images, "label": labels}, features=features)
    DatasetDict(train=split, validation=split).save_to_disk(str(output_dir))
    return Path(output_dir)


def small_fashion_mnist(folder: Path, per_split: int = 300) -> Path:
    """The first `per_split` images of each Fashion-MNIST split, built from Debian's files (skip without them)."""
    if not (download_dataset.FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    download_dataset.main(["--dataset", "fashion-mnist", "--max_per_split", str(per_split), "--output_dir", str(folder)])
    return folder


def fashion_mnist_canvases(root: Path, count: int, canvas_size: int = 56) -> Path:
    """`count` Fashion-MNIST segmentation canvases as both the training and the validation split (skip without
    Debian's files)."""
    if not (download_dataset.FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    built = download_dataset.main([
        "--dataset", "fashion-mnist-seg", "--canvas_size", str(canvas_size), "--max_per_split", str(count),
        "--output_dir", str(root / "built"),
    ])  # fmt: skip
    split = datasets.load_from_disk(str(built))["train"]
    DatasetDict(train=split, validation=split).save_to_disk(str(root / "both"))
    (root / "both" / "id2label.json").write_text((built / "id2label.json").read_text())
    return root / "both"


def recipe_command(tmp_path, script: str, **env) -> list[str]:
    """The command line a recipe script (`scripts/<script>`) launches on one GPU (NPROC_PER_NODE in `env` for more),
    from the entry point's name on, recorded by a stand-in for Python (which still runs the scripts' `python -c`
    arithmetic). `--use_cpu True` goes through as an extra flag: bf16 needs it here."""
    stand_in, record = tmp_path / "python", tmp_path / "argv"
    stand_in.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\nprintf "%s\\n" "$@" > {record}\n')
    stand_in.chmod(0o755)
    model = tmp_path / "classifier"
    model.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHON": str(stand_in), "NPROC_PER_NODE": "1", "REPORT_TO": "none", "MODEL": str(model), **env}
    command = ["bash", str(REPO / "scripts" / script), "--use_cpu", "True"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    return argv[next(index for index, value in enumerate(argv) if value.endswith(".py")):]
