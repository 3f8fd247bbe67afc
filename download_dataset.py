"""Build the image datasets the training scripts read, and save them with `save_to_disk`.

    python download_dataset.py                          # ImageNet-1k from the Hub -> data/imagenet-1k-hf
    python download_dataset.py --dataset fashion-mnist  # Fashion-MNIST -> data/fashion-mnist-hf
    python download_dataset.py --imagefolder ~/inet     # ~/inet/train/<class>/*, ~/inet/val/<class>/* -> data/inet-hf

Whatever the source, the result is a `DatasetDict` with `train` and `validation` splits, an `image` column
(`datasets.Image`, the encoded file bytes embedded) and a `label` column (`datasets.ClassLabel`), so every
script reads every dataset the same way: `datasets.load_from_disk(path)`.

Segmentation datasets have a `label` column of masks instead (`datasets.Image`, single-channel PNGs of class
indices, 255 = ignored) and an `id2label.json` beside the splits:

    python download_dataset.py --dataset fashion-mnist-seg           # Fashion-MNIST items on canvases, offline
    python download_dataset.py --dataset ade20k --archive ADEChallengeData2016.zip   # SceneParse-150
"""

import argparse
import gzip
import io
import json
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset

from nepa.args import Use, add_bool_argument, parse_flags
from nepa.segmentation import IGNORE_INDEX

IMAGENET_HUB = "ILSVRC/imagenet-1k"
IMAGENET_REVISION = "4603483700ee984ea9debe3ddbfdeae86f6489eb"
IMAGENET_GB = 150
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
]
CANVAS_ITEMS = (2, 4)  # items per canvas, inclusive
CANVAS_FOREGROUND = 32  # an item's pixels brighter than this are its mask; darker ones stay background
ADE20K_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
ADE20K_SIZES = {"train": 20210, "validation": 2000}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GB = 10**9


class DatasetBuildError(Exception):
    """A dataset that cannot be built as asked; the message says why and what to do instead."""


def free_bytes(path: Path) -> int:
    """Free space on the disk that will hold `path` (which may not exist yet)."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def require_free_space(path: Path, needed: int, what: str) -> None:
    free = free_bytes(path)
    if free < needed:
        raise DatasetBuildError(
            f"{what} needs about {needed / GB:.1f} GB free at {path}, but only {free / GB:.1f} GB is free there. "
            "Free some space or choose another disk with --output_dir."
        )


def load_from_hub(name: str, revision: str | None = None) -> DatasetDict:
    try:
        return load_dataset(name, revision=revision)
    except OSError as error:  # no network, offline mode, gated dataset, not logged in: all arrive as OSError
        raise DatasetBuildError(
            f"Could not load {name} from the Hugging Face Hub ({type(error).__name__}: {error}).\n"
            "Without network access or without access to this dataset, build one from local files instead:\n"
            "  python download_dataset.py --dataset fashion-mnist  (offline, Debian package dataset-fashion-mnist)\n"
            "  python download_dataset.py --imagefolder DIR        (DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg)\n"
            "To use the Hub, log in with `hf auth login` and accept the dataset's terms at "
            f"https://huggingface.co/datasets/{name}"
        ) from None


def build_imagenet(output_dir: Path) -> DatasetDict:
    print(
        f"ImageNet-1k needs about {IMAGENET_GB} GB of disk for the saved dataset, "
        "and the Hugging Face cache keeps the downloaded files as well until you delete them."
    )
    require_free_space(output_dir, IMAGENET_GB * GB, "ImageNet-1k")
    dataset = load_from_hub(IMAGENET_HUB, revision=IMAGENET_REVISION)
    return DatasetDict(train=dataset["train"], validation=dataset["validation"])  # the Hub's test split has no labels


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): 2 zero bytes, type 0x08 (uint8), ndim, big-endian uint32 sizes, then the data."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != np.prod(shape):
        raise ValueError(f"{path} holds {values.size} values but its header promises {shape}; the file is damaged")
    return values.reshape(shape)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def build_fashion_mnist(debian_dir: Path = FASHION_MNIST_DEBIAN_DIR, max_per_split: int | None = None) -> DatasetDict:
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_CLASSES)})
    if not debian_dir.is_dir():
        print(f"{debian_dir} not found (Debian package dataset-fashion-mnist); loading {FASHION_MNIST_HUB} instead")
        dataset = load_from_hub(FASHION_MNIST_HUB)
        splits = {"train": dataset["train"], "validation": dataset["test"]}
        if max_per_split is not None:
            splits = {name: split.select(range(min(max_per_split, len(split)))) for name, split in splits.items()}
        return DatasetDict({name: split.cast(features) for name, split in splits.items()})

    print(f"Building Fashion-MNIST from {debian_dir}")
    splits = {}
    for split, prefix in [("train", "train"), ("validation", "t10k")]:
        image_file = debian_dir / f"{prefix}-images-idx3-ubyte.gz"
        label_file = debian_dir / f"{prefix}-labels-idx1-ubyte.gz"
        for file in (image_file, label_file):
            if not file.is_file():
                raise DatasetBuildError(f"{file} is missing; reinstall the Debian package dataset-fashion-mnist")
        images, labels = read_idx(image_file)[:max_per_split], read_idx(label_file)[:max_per_split]
        if len(images) != len(labels):
            raise ValueError(f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels")
        columns = {"image": [png_bytes(image) for image in images], "label": labels.tolist()}
        splits[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)


def render_canvas(images: np.ndarray, labels: np.ndarray, index: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Canvas `index` of a split: 2-4 items drawn by a generator seeded with (seed, index) alone, so a canvas
    does not depend on how many are built. Later items cover earlier ones where they overlap. Returns the
    grey canvas and its mask: 0 = background, class + 1 where an item's pixel is brighter than
    CANVAS_FOREGROUND."""
    rng = np.random.default_rng([seed, index])
    canvas = np.zeros((size, size), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    item_size = images.shape[1]
    for _ in range(rng.integers(CANVAS_ITEMS[0], CANVAS_ITEMS[1] + 1)):
        item = int(rng.integers(len(images)))
        top, left = (int(value) for value in rng.integers(size - item_size + 1, size=2))
        foreground = images[item] > CANVAS_FOREGROUND
        canvas[top : top + item_size, left : left + item_size][foreground] = images[item][foreground]
        mask[top : top + item_size, left : left + item_size][foreground] = labels[item] + 1
    return canvas, mask


def build_fashion_mnist_seg(
    debian_dir: Path = FASHION_MNIST_DEBIAN_DIR, canvas_size: int = 64, max_per_split: int | None = None
) -> tuple[DatasetDict, dict[int, str]]:
    """Segmentation canvases of real Fashion-MNIST items: training canvases from the training images,
    validation canvases from the test images; as many canvases as source images unless `max_per_split`."""
    if canvas_size < 28:
        raise DatasetBuildError(f"--canvas_size {canvas_size} is smaller than a 28-pixel Fashion-MNIST item; use 56 or 64.")
    if not debian_dir.is_dir():
        raise DatasetBuildError(
            f"{debian_dir} not found: fashion-mnist-seg is built from the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist)."
        )
    features = Features({"image": Image(), "label": Image()})
    splits = {}
    for split, prefix, seed in [("train", "train", 0), ("validation", "t10k", 1)]:
        images = read_idx(debian_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(debian_dir / f"{prefix}-labels-idx1-ubyte.gz")
        count = len(images) if max_per_split is None else max_per_split
        canvases = [render_canvas(images, labels, index, canvas_size, seed) for index in range(count)]
        columns = {"image": [png_bytes(c) for c, _ in canvases], "label": [png_bytes(m) for _, m in canvases]}
        splits[split] = Dataset.from_dict(columns, features=features)
    print(f"Built {canvas_size}x{canvas_size} canvases of {CANVAS_ITEMS[0]}-{CANVAS_ITEMS[1]} items from {debian_dir}")
    return DatasetDict(splits), {0: "background", **{i + 1: name for i, name in enumerate(FASHION_MNIST_CLASSES)}}


def reduce_zero_label(mask_png: bytes) -> bytes:
    """ADE20K's masks: 0 ("other objects") becomes IGNORE_INDEX (255) and classes 1..150 become 0..149."""
    with PIL.Image.open(io.BytesIO(mask_png)) as image:
        mask = np.array(image, dtype=np.int16)
    return png_bytes(np.where(mask == 0, IGNORE_INDEX, mask - 1).astype(np.uint8))


def ade20k_archive(archive: Path | None, download_dir: Path) -> Path:
    """The given archive, or the official one downloaded into `download_dir`; offline, a message saying what to get."""
    if archive is not None:
        if not archive.is_file():
            raise DatasetBuildError(f"--archive {archive} is not a file; pass the path of ADEChallengeData2016.zip.")
        return archive
    target = download_dir / "ADEChallengeData2016.zip"
    if target.is_file():
        return target
    print(f"Downloading {ADE20K_URL} (about 1 GB) to {target}")
    partial = target.with_suffix(".zip.partial")
    try:
        urllib.request.urlretrieve(ADE20K_URL, partial)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise DatasetBuildError(
            f"Could not download ADE20K ({type(error).__name__}: {error}).\n"
            f"Download the SceneParse-150 archive ADEChallengeData2016.zip (about 1 GB) from {ADE20K_URL} "
            "(linked from http://sceneparsing.csail.mit.edu) on a machine with network access, copy it here, and run\n"
            "  python download_dataset.py --dataset ade20k --archive /path/to/ADEChallengeData2016.zip"
        ) from None
    partial.rename(target)
    return target


def ade20k_class_names(archive: zipfile.ZipFile) -> dict[int, str]:
    """The 150 names of objectInfo150.txt (Idx, Ratio, Train, Val, Name; tab-separated), as the reduced ids 0..149."""
    info = next((name for name in archive.namelist() if name.endswith("objectInfo150.txt")), None)
    if info is None:
        raise DatasetBuildError("the archive has no objectInfo150.txt: it is not the official ADEChallengeData2016.zip.")
    rows = archive.read(info).decode().strip().splitlines()[1:]
    return {int(row.split("\t")[0]) - 1: row.split("\t")[-1].split(";")[0].strip() for row in rows}


def read_ade20k_pairs(archive_path: str, split_dir: str):
    with zipfile.ZipFile(archive_path) as archive:
        names = archive.namelist()
        images = sorted(name for name in names if f"/images/{split_dir}/" in name and name.endswith(".jpg"))
        annotations = {Path(name).stem: name for name in names if f"/annotations/{split_dir}/" in name and name.endswith(".png")}
        for image in images:
            if Path(image).stem not in annotations:
                raise DatasetBuildError(f"{image} has no annotation {split_dir}/{Path(image).stem}.png in the archive.")
            yield {
                "image": {"bytes": archive.read(image), "path": Path(image).name},
                "label": {"bytes": reduce_zero_label(archive.read(annotations[Path(image).stem])), "path": f"{Path(image).stem}.png"},
            }


def build_ade20k(archive: Path, cache_dir: str) -> tuple[DatasetDict, dict[int, str]]:
    """SceneParse-150 from ADEChallengeData2016.zip: images/{training,validation}/*.jpg with the masks of
    annotations/, reduced to 150 classes (0..149) and 255 for ADE20K's "other objects"."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            id2label = ade20k_class_names(zipped)
    except zipfile.BadZipFile as error:
        raise DatasetBuildError(f"{archive} is not a readable zip archive ({error}); download it again.") from None
    features = Features({"image": Image(), "label": Image()})
    splits = {}
    for split, split_dir in [("train", "training"), ("validation", "validation")]:
        splits[split] = Dataset.from_generator(
            read_ade20k_pairs, features, gen_kwargs={"archive_path": str(archive), "split_dir": split_dir},
            cache_dir=cache_dir, split=split,
        )
        if len(splits[split]) != ADE20K_SIZES[split]:
            print(f"Note: {split} holds {len(splits[split])} pairs; the official archive has {ADE20K_SIZES[split]}.")
    return DatasetDict(splits), id2label


def list_images(split_dir: Path, class_names: list[str]) -> tuple[list[str], list[int]]:
    """Every file with an image extension under each class folder, with its label; none is opened here."""
    paths, labels, ignored, empty = [], [], [], []
    for label, class_name in enumerate(class_names):
        class_dir = split_dir / class_name
        found = len(paths)
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(class_dir).parts):
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(path))
                labels.append(label)
            else:
                ignored.append(path)
        if len(paths) == found:
            empty.append(class_name)
    if ignored:
        print(f"{split_dir}: ignored {len(ignored)} files without an image extension, for example {ignored[0]}")
    if not paths:
        raise DatasetBuildError(f"{split_dir} holds no image files ({sorted(IMAGE_EXTENSIONS)}) in its class folders")
    if empty:
        raise DatasetBuildError(
            f"{split_dir} has class folders without image files ({sorted(IMAGE_EXTENSIONS)}): {empty}. "
            f"Add images to them, or remove these classes from every split."
        )
    return paths, labels


def class_folders(split_dir: Path) -> list[str]:
    names = sorted(path.name for path in split_dir.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not names:
        raise DatasetBuildError(
            f"{split_dir} has no class folders; expected {split_dir}/<class>/<image files>. "
            "(The raw ILSVRC2012 validation images come in one flat folder: sort them into class folders first.)"
        )
    return names


def read_files(paths: list[str], labels: list[int]):
    # A file:// URI, not a plain path: datasets stores only the path of an existing local file (dropping its bytes)
    # and save_to_disk cuts a local path to its file name. A URI keeps both the bytes and the whole name of a bad file.
    for path, label in zip(paths, labels):
        yield {"image": {"bytes": Path(path).read_bytes(), "path": Path(path).as_uri()}, "label": label}


def build_imagefolder(source: Path, cache_dir: str) -> DatasetDict:
    """DIR/train/<class>/* and DIR/val/<class>/* (or DIR/validation/), stored as the files' raw bytes, undecoded.

    A broken file is kept as it is: the training scripts skip and log it, naming it by the URI kept beside its bytes.
    """
    source = source.expanduser().absolute()
    if not source.is_dir():
        raise DatasetBuildError(
            f"--imagefolder {source} is not a directory; expected {source}/train/<class>/ and {source}/val/<class>/"
        )
    if not (source / "train").is_dir():
        raise DatasetBuildError(f"{source}/train not found; expected the training images in {source}/train/<class>/")
    validation_dirs = [source / name for name in ("val", "validation") if (source / name).is_dir()]
    if len(validation_dirs) != 1:
        found = "both val/ and validation/" if validation_dirs else "neither val/ nor validation/"
        raise DatasetBuildError(f"{source} holds {found}; expected exactly one, with the validation images in class folders")
    split_dirs = {"train": source / "train", "validation": validation_dirs[0]}

    class_names = class_folders(split_dirs["train"])
    if len(class_names) < 2:
        raise DatasetBuildError(
            f"{split_dirs['train']} holds one class folder ({class_names[0]}); a classifier needs at least two: "
            f"put each class's images in a folder of its own, {split_dirs['train']}/<class>/."
        )
    validation_classes = class_folders(split_dirs["validation"])
    if validation_classes != class_names:
        missing = sorted(set(class_names) - set(validation_classes))
        extra = sorted(set(validation_classes) - set(class_names))
        raise DatasetBuildError(
            f"{split_dirs['validation']} must hold the same class folders as {split_dirs['train']}: "
            f"missing there {missing}, not in train {extra}"
        )

    files = {split: list_images(split_dir, class_names) for split, split_dir in split_dirs.items()}
    source_bytes = sum(Path(path).stat().st_size for paths, _ in files.values() for path in paths)
    # One copy in the build cache (beside the destination) while building, one in the saved dataset.
    require_free_space(Path(cache_dir), 2 * source_bytes, f"Building from {source}")

    features = Features({"image": Image(), "label": ClassLabel(names=class_names)})
    splits = {}
    for split, (paths, labels) in files.items():
        print(f"{split}: {len(paths)} files in {len(class_names)} classes from {split_dirs[split]}")
        splits[split] = Dataset.from_generator(
            read_files, features, gen_kwargs={"paths": paths, "labels": labels}, cache_dir=cache_dir, split=split
        )
    return DatasetDict(splits)


def holds_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def check_destination(output_dir: Path, overwrite: bool) -> None:
    if not output_dir.exists():
        return
    if not output_dir.is_dir() or (any(output_dir.iterdir()) and not holds_dataset(output_dir)):
        raise DatasetBuildError(f"{output_dir} exists and is not a saved dataset; choose another --output_dir")
    if holds_dataset(output_dir) and not overwrite:
        raise DatasetBuildError(
            f"{output_dir} already holds a dataset; pass --overwrite to replace it, or choose another --output_dir"
        )


def save(dataset: DatasetDict, output_dir: Path, overwrite: bool, id2label: dict[int, str] | None = None) -> None:
    """Save beside the destination, then move into place, so a build killed halfway never looks like a dataset.
    A segmentation dataset's class names go to `id2label.json` inside it."""
    check_destination(output_dir, overwrite)
    partial = output_dir.with_name(f".{output_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    dataset.save_to_disk(str(partial))
    if id2label is not None:
        (partial / "id2label.json").write_text(json.dumps({str(i): name for i, name in id2label.items()}, indent=1))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    partial.rename(output_dir)
    sizes = ", ".join(f"{split} {len(split_data)}" for split, split_data in dataset.items())
    num_classes = len(id2label) if id2label is not None else dataset["train"].features["label"].num_classes
    print(f"Saved {output_dir} ({sizes} images, {num_classes} classes)")


def building(*datasets: str) -> Use:
    return Use(f"is used only with --dataset {' / '.join(datasets)}", lambda a: a.imagefolder is None and a.dataset in datasets)


# Where each flag applies (nepa.args.parse_flags refuses it elsewhere); the others apply to every build.
FLAG_USES = {
    "max_per_split": building("fashion-mnist", "fashion-mnist-seg"),
    "canvas_size": building("fashion-mnist-seg"),
    "archive": building("ade20k"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--dataset", choices=["imagenet-1k", "fashion-mnist", "fashion-mnist-seg", "ade20k"], default="imagenet-1k"
    )
    source.add_argument("--imagefolder", type=Path, help="a local DIR/train/<class>/*, DIR/val/<class>/* tree")
    parser.add_argument("--output_dir", type=Path, help="default: data/<dataset>-hf")
    add_bool_argument(parser, "--overwrite", "replace a dataset already saved at the destination")
    parser.add_argument(
        "--max_per_split", type=int, help="fashion-mnist(-seg) only: keep the first N images (canvases) of each split"
    )
    parser.add_argument("--canvas_size", type=int, default=64, help="fashion-mnist-seg: canvas side in pixels")
    parser.add_argument("--archive", type=Path, help="ade20k: the path of ADEChallengeData2016.zip (else downloaded)")
    args = parse_flags(parser, argv, FLAG_USES)
    if args.max_per_split is not None and args.max_per_split < 1:
        parser.error(f"--max_per_split must be at least 1, got {args.max_per_split}")
    return args


def run(args: argparse.Namespace) -> Path:
    name = args.imagefolder.expanduser().resolve().name if args.imagefolder else args.dataset
    output_dir = (args.output_dir or Path("data") / f"{name}-hf").expanduser().absolute()
    check_destination(output_dir, args.overwrite)  # before any download or build, which can take hours
    output_dir.parent.mkdir(parents=True, exist_ok=True)

    if args.imagefolder:
        with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.build-", dir=output_dir.parent) as cache_dir:
            save(build_imagefolder(args.imagefolder, cache_dir), output_dir, args.overwrite)
    elif args.dataset == "fashion-mnist":
        save(build_fashion_mnist(max_per_split=args.max_per_split), output_dir, args.overwrite)
    elif args.dataset == "fashion-mnist-seg":
        dataset, id2label = build_fashion_mnist_seg(canvas_size=args.canvas_size, max_per_split=args.max_per_split)
        save(dataset, output_dir, args.overwrite, id2label)
    elif args.dataset == "ade20k":
        archive = ade20k_archive(args.archive, output_dir.parent)
        with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.build-", dir=output_dir.parent) as cache_dir:
            dataset, id2label = build_ade20k(archive, cache_dir)
            save(dataset, output_dir, args.overwrite, id2label)
    else:
        save(build_imagenet(output_dir), output_dir, args.overwrite)
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    """Build and save the dataset the command line names; a problem exits with its message, not a traceback."""
    try:
        return run(parse_args(argv))
    except DatasetBuildError as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
