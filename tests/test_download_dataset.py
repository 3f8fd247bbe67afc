import gzip
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Image, load_from_disk

import download_dataset
from image_folder import add_bad_images, make_image_folder

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = download_dataset.FASHION_MNIST_DEBIAN_DIR


def raw_images(split):
    """The stored Image structs (bytes and path), undecoded."""
    return split.cast_column("image", Image(decode=False))["image"]


def test_imagefolder_is_saved_self_contained(tmp_path):
    source = make_image_folder(tmp_path / "photos", num_classes=3, per_class=4, val_per_class=2)
    source_bytes = {path.as_uri(): path.read_bytes() for path in source.rglob("*.jpg")}
    output_dir = tmp_path / "saved"
    download_dataset.main(["--imagefolder", str(source), "--output_dir", str(output_dir)])
    shutil.rmtree(source)  # the saved dataset must not need the source files

    dataset = load_from_disk(str(output_dir))
    assert set(dataset) == {"train", "validation"}
    assert (len(dataset["train"]), len(dataset["validation"])) == (12, 6)
    for split in dataset.values():
        assert split.features["image"] == Image()
        assert split.features["label"] == ClassLabel(names=["class_0", "class_1", "class_2"])
        for image, label in zip(raw_images(split), split["label"]):
            assert image["bytes"] == source_bytes[image["path"]]
            assert f"/class_{label}/" in image["path"]
    assert {image["path"].split("/")[-3] for image in raw_images(dataset["validation"])} == {"val"}
    first = dataset["train"][0]["image"]
    assert first.size == (40, 32) and first.mode == "RGB"


def test_default_destination_is_named_after_the_folder(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "pets", num_classes=2, per_class=1, val_per_class=1)
    monkeypatch.chdir(tmp_path)
    output_dir = download_dataset.main(["--imagefolder", "pets/"])
    assert output_dir == tmp_path / "data" / "pets-hf"
    assert len(load_from_disk(str(output_dir))["train"]) == 2


def test_validation_folder_may_be_named_validation(tmp_path):
    source = make_image_folder(tmp_path / "photos", num_classes=2, per_class=2, val_per_class=3)
    (source / "val").rename(source / "validation")
    download_dataset.main(["--imagefolder", str(source), "--output_dir", str(tmp_path / "saved")])
    assert len(load_from_disk(str(tmp_path / "saved"))["validation"]) == 6


def remove_train(source):
    shutil.rmtree(source / "train")


def remove_val(source):
    shutil.rmtree(source / "val")


def add_validation_beside_val(source):
    shutil.copytree(source / "val", source / "validation")


def mismatch_classes(source):
    (source / "val" / "class_0").rename(source / "val" / "class_9")


def keep_one_class(source):
    for split in ("train", "val"):
        shutil.rmtree(source / split / "class_1")


def empty_train_class(source):
    for image in (source / "train" / "class_1").iterdir():
        image.unlink()


def empty_val_class(source):
    for image in (source / "val" / "class_0").iterdir():
        image.rename(image.with_suffix(".txt"))


def add_val_only_class(source):
    shutil.copytree(source / "val" / "class_0", source / "val" / "class_new")


def flatten_val(source):
    for class_dir in list((source / "val").iterdir()):
        for image in class_dir.iterdir():
            image.rename(source / "val" / f"{class_dir.name}_{image.name}")
        class_dir.rmdir()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (None, ["absent", "is not a directory", "train/<class>"]),
        (remove_train, ["train not found"]),
        (remove_val, ["neither val/ nor validation/"]),
        (add_validation_beside_val, ["both val/ and validation/"]),
        (mismatch_classes, ["missing there ['class_0']", "not in train ['class_9']"]),
        (flatten_val, ["no class folders"]),
        (keep_one_class, ["one class folder (class_0)", "at least two"]),
        (empty_train_class, ["train has class folders without image files", "['class_1']"]),
        (empty_val_class, ["val has class folders without image files", "['class_0']"]),
        (add_val_only_class, ["not in train ['class_new']"]),
    ],
)
def test_bad_layout_is_a_clear_error(tmp_path, damage, expected):
    source = make_image_folder(tmp_path / "photos", num_classes=2, per_class=1, val_per_class=1)
    if damage is None:
        source = tmp_path / "absent"
    else:
        damage(source)
    with pytest.raises(SystemExit) as error:
        download_dataset.main(["--imagefolder", str(source), "--output_dir", str(tmp_path / "saved")])
    for text in expected:
        assert text in str(error.value)
    assert not (tmp_path / "saved").exists()


def test_existing_dataset_is_replaced_only_with_overwrite(tmp_path):
    output_dir = tmp_path / "out" / "saved"
    first = make_image_folder(tmp_path / "first", num_classes=2, per_class=3, val_per_class=1)
    second = make_image_folder(tmp_path / "second", num_classes=2, per_class=1, val_per_class=1)
    download_dataset.main(["--imagefolder", str(first), "--output_dir", str(output_dir)])

    with pytest.raises(SystemExit, match="already holds a dataset; pass --overwrite"):
        download_dataset.main(["--imagefolder", str(second), "--output_dir", str(output_dir)])
    assert len(load_from_disk(str(output_dir))["train"]) == 6

    download_dataset.main(["--imagefolder", str(second), "--output_dir", str(output_dir), "--overwrite"])
    assert len(load_from_disk(str(output_dir))["train"]) == 2
    assert [path.name for path in output_dir.parent.iterdir()] == ["saved"]  # no build or partial folders left


def test_folder_that_is_not_a_dataset_is_never_deleted(tmp_path):
    source = make_image_folder(tmp_path / "photos", num_classes=2, per_class=1, val_per_class=1)
    output_dir = tmp_path / "notes"
    output_dir.mkdir()
    (output_dir / "todo.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="exists and is not a saved dataset"):
        download_dataset.main(["--imagefolder", str(source), "--output_dir", str(output_dir), "--overwrite"])
    assert (output_dir / "todo.txt").read_text() == "keep me"


def test_bad_files_are_stored_as_they_are(tmp_path):
    source = make_image_folder(tmp_path / "photos", num_classes=2, per_class=2, val_per_class=1)
    undecodable = {path.as_uri() for path in add_bad_images(source / "train")}
    download_dataset.main(["--imagefolder", str(source), "--output_dir", str(tmp_path / "saved")])

    train = load_from_disk(str(tmp_path / "saved"))["train"]
    assert len(train) == 4 + 9
    failed, sizes = set(), {}
    for image in raw_images(train):
        try:
            decoded = Image().decode_example(image)
        except Exception:
            failed.add(image["path"])
        else:
            sizes[image["path"].rsplit("/", 1)[-1]] = (decoded.size, decoded.mode)
    assert failed == undecodable  # the bad ones reach the training code undecodable, the rest decode
    assert sizes["odd_large.jpg"] == ((4000, 3000), "RGB")
    assert sizes["odd_1x1.png"] == ((1, 1), "RGB")
    modes = [sizes[name][1] for name in ("odd_cmyk.jpg", "odd_gray16.png", "odd_gray.jpg", "odd_rgba.png")]
    assert modes == ["CMYK", "I;16", "L", "RGBA"]


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason=f"{FASHION_MNIST_DIR} absent (Debian package dataset-fashion-mnist)"
)
def test_fashion_mnist_from_debian_files(tmp_path):
    output_dir = tmp_path / "fashion"
    download_dataset.main(["--dataset", "fashion-mnist", "--max_per_split", "50", "--output_dir", str(output_dir)])
    dataset = load_from_disk(str(output_dir))

    assert set(dataset) == {"train", "validation"}
    for split, prefix in [("train", "train"), ("validation", "t10k")]:
        data = dataset[split]
        assert len(data) == 50
        assert data.features["label"].names == download_dataset.FASHION_MNIST_CLASSES
        assert len(data.features["label"].names) == 10
        with gzip.open(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz") as file:
            assert data["label"] == list(file.read(8 + 50)[8:])
        with gzip.open(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz") as file:
            first_pixels = np.frombuffer(file.read(16 + 28 * 28)[16:], dtype=np.uint8).reshape(28, 28)
        first = data[0]["image"]
        assert (first.size, first.mode) == ((28, 28), "L")
        np.testing.assert_array_equal(np.asarray(first), first_pixels)


def test_hub_failure_names_the_other_options(tmp_path):
    # conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, so the Hub fallback fails at once
    with pytest.raises(download_dataset.DatasetBuildError) as error:
        download_dataset.build_fashion_mnist(debian_dir=tmp_path / "absent", max_per_split=10)
    message = str(error.value)
    expected = ["zalando-datasets/fashion_mnist", "--dataset fashion-mnist", "dataset-fashion-mnist"]
    for text in expected + ["--imagefolder DIR", "hf auth login"]:
        assert text in message


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_imagenet_checks_free_disk_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(200 * 10**9, 190 * 10**9, 10 * 10**9))
    with pytest.raises(SystemExit, match=r"needs about 150.0 GB free .* only 10.0 GB is free"):
        download_dataset.main(["--output_dir", str(tmp_path / "imagenet")])

    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10**12, 0, 10**12))
    with pytest.raises(SystemExit, match="Could not load ILSVRC/imagenet-1k from the Hugging Face Hub"):
        download_dataset.main(["--output_dir", str(tmp_path / "imagenet")])


def test_max_per_split_is_for_fashion_mnist_only(tmp_path):
    with pytest.raises(SystemExit):
        download_dataset.main(["--imagefolder", str(tmp_path), "--max_per_split", "5"])


def test_command_line_error_is_a_message_not_a_traceback(tmp_path):
    arguments = ["--imagefolder", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "saved")]
    command = [sys.executable, "download_dataset.py", *arguments]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{tmp_path / 'absent'} is not a directory" in result.stderr
    assert "Traceback" not in result.stderr
