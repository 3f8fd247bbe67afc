"""Images/s of one data-loading worker: the plain "PIL decode + torchvision transforms on float tensors" pipelines
against the project's (`nepa.data`: torchvision's JPEG decoder, transforms on uint8, normalisation once per batch),
in the same run on the same JPEG photographs.

    .venv/bin/python -m bench.data_pipeline                 # about 1.5 minutes on 2 busy cores
    .venv/bin/python -m bench.data_pipeline --rounds 31     # tighter medians

One torch thread and no DataLoader workers, so a figure is what one worker process delivers; images/s come from the
median CPU time of the working thread (what a worker with a core of its own takes), with the wall-clock ratio beside
them. Every pipeline ends in a collated batch, as the DataLoader would hand it over. The project's per-batch steps
(`BatchNormalize`, `BatchAugment`) run on the training device in a real run; here they run on this CPU and count in
the project's total ("worker only" leaves them out).

The photographs are ImageNet-sized variants (about 500x375 and 375x500, JPEG quality 90) of scikit-learn's two
sample photographs, held as `{"bytes": ..., "path": None}` records like a `save_to_disk` dataset gives.
"""

import argparse
import io
import random
import statistics
import time
from collections import defaultdict

import datasets
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from sklearn.datasets import load_sample_images
from torch.utils.data import default_collate
from torchvision.io import decode_jpeg
from torchvision.transforms import v2

from nepa.data import (
    RAND_AUGMENT,
    BatchAugment,
    BatchNormalize,
    ChannelsLastResizedCrop,
    EvalTransform,
    FinetuneTransform,
    ImageDataset,
    RandomCropFlip,
    collate_images,
    decode_rgb_tensor,
)

MEAN = STD = (0.5, 0.5, 0.5)


def make_photographs(count: int, seed: int = 0) -> list[dict]:
    """Random crops / resizes / flips of the two sample photographs, landscape 500x375 or portrait 375x500."""
    rng = random.Random(seed)
    photos = [Image.fromarray(array) for array in load_sample_images().images]
    records = []
    for index in range(count):
        photo = photos[index % 2]
        width, height = (500, 375) if index % 4 < 2 else (375, 500)
        fraction = rng.uniform(0.6, 1.0)  # of the largest box of that shape that fits the photograph
        box_h = min(photo.height, photo.width * height / width) * fraction
        box_w = box_h * width / height
        left, top = rng.uniform(0, photo.width - box_w), rng.uniform(0, photo.height - box_h)
        image = photo.resize((width, height), Image.BICUBIC, box=(left, top, left + box_w, top + box_h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        records.append({"bytes": buffer.getvalue(), "path": None})
    return records


def photograph_split(records: list[dict]) -> datasets.Dataset:
    """The records as a `datasets` split, the way the training scripts read images."""
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": records, "label": [0] * len(records)}, features=features)


def open_pil(record: dict) -> Image.Image:
    return Image.open(io.BytesIO(record["bytes"])).convert("RGB")


# --- the pipelines -------------------------------------------------------------------------------------------------


def build_pipelines(size: int, split: datasets.Dataset) -> tuple[dict[str, tuple], list[ImageDataset]]:
    """(name -> (plain, project worker, project batch step), the project's datasets).

    Each plain pipeline and each project worker is a function of a list of row indices of `split` returning a
    collated batch (what a DataLoader worker hands over): both read the Arrow rows; the project's worker is
    `nepa.data.ImageDataset` (per-image seeding and bad-image handling included). The project's batch step is what
    the training loop then does to that batch on the device. Every pipeline ends in float32 pixels of shape
    (batch, 3, size, size). The datasets are returned so that each timed round can be a new epoch: the project
    seeds every image's augmentation by (seed, epoch, index), and the plain side draws new augmentations each round."""
    normalize = BatchNormalize(MEAN, STD)
    project_datasets = []

    def plain(transform):
        return lambda rows: default_collate([transform(open_pil(split[i]["image"])) for i in rows])

    def project(transform, batch_step):
        dataset = ImageDataset(split, transform)
        project_datasets.append(dataset)
        return lambda rows: collate_images([dataset[i] for i in rows]), batch_step

    def normalize_batch(batch):
        return normalize(batch["pixel_values"])

    batch_augment = BatchAugment(random_erasing=RandomErasing(0.25, mode="pixel", device="cpu"), mixup=None)

    def normalize_and_erase(batch):
        return batch_augment(normalize(batch["pixel_values"]), batch["labels"])[0]

    plain_pretrain = T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
    tensor_first = T.Compose(
        [T.ToTensor(), T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.Normalize(MEAN, STD)]
    )
    plain_finetune = create_transform(
        size,
        is_training=True,
        auto_augment=RAND_AUGMENT,
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        color_jitter=None,
        mean=MEAN,
        std=STD,
    )
    plain_eval = T.Compose(
        [
            T.Resize(int(size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    project_pretrain = project(RandomCropFlip(size), normalize_batch)
    pipelines = {
        "pretraining (RandomResizedCrop, flip)": (plain(plain_pretrain), *project_pretrain),
        "pretraining, plain with ToTensor first": (plain(tensor_first), *project_pretrain),
        f"fine-tuning (timm {RAND_AUGMENT}, erasing 0.25)": (
            plain(plain_finetune),
            *project(FinetuneTransform(size, RAND_AUGMENT, MEAN), normalize_and_erase),
        ),
        "evaluation (resize 256 bicubic, centre crop 224)": (
            plain(plain_eval),
            *project(EvalTransform(size, crop_pct=0.875), normalize_batch),
        ),
    }
    return pipelines, project_datasets


def leaf_transforms(transform):
    """The single transforms inside a Compose or a `nepa.data` transform, in order."""
    if isinstance(transform, (T.Compose, v2.Compose)):
        for part in transform.transforms:
            yield from leaf_transforms(part)
    elif type(transform).__module__ == "nepa.data" and not isinstance(transform, v2.Transform):
        for part in vars(transform).values():
            if part is not None:
                yield from leaf_transforms(part)
    else:
        yield transform


def augmentation_parameters(size: int) -> list[tuple[str, str]]:
    """The crop, flip and RandAugment settings of each side, read from the constructed transforms."""
    plain_finetune = create_transform(
        size, is_training=True, auto_augment=RAND_AUGMENT, interpolation="bicubic", color_jitter=None, mean=MEAN
    )
    transforms = {
        "pretraining, plain": T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()]),
        "pretraining, project": RandomCropFlip(size),
        "fine-tuning, plain": plain_finetune,
        "fine-tuning, project": FinetuneTransform(size, RAND_AUGMENT, MEAN),
    }
    rows = []
    for name, transform in transforms.items():
        parts = list(leaf_transforms(transform))
        crop = next(part for part in parts if hasattr(part, "scale") and hasattr(part, "ratio"))
        flip = next(part for part in parts if "HorizontalFlip" in type(part).__name__)
        interpolation = getattr(crop.interpolation, "value", crop.interpolation)
        ratio = tuple(round(r, 4) for r in crop.ratio)
        description = f"crop scale {tuple(crop.scale)}, ratio {ratio}, {interpolation}; flip p={flip.p}"
        rand_augment = next((part for part in parts if hasattr(part, "ops")), None)
        if rand_augment is not None:
            ops = ", ".join(op.name for op in rand_augment.ops)
            description += (
                f"; RandAugment n={rand_augment.num_layers}, m={rand_augment.ops[0].magnitude}, "
                f"mstd={rand_augment.ops[0].magnitude_std}, fill {rand_augment.ops[0].hparams['img_mean']}, ops: {ops}"
            )
        rows.append((name, description))
    return rows


# --- where a worker's time goes: single stages, ms per image -------------------------------------------------------


def build_stages(records: list[dict], size: int) -> list[tuple[str, list, object]]:
    """(stage, inputs, function of one input) for each stage; a batch stage's input is a whole batch."""
    pil = [open_pil(record) for record in records]
    uint8 = [decode_rgb_tensor(record) for record in records]
    crops = [T.RandomResizedCrop(size)(image) for image in pil]
    floats = [T.ToTensor()(image) for image in crops]
    batch_uint8 = torch.stack([T.PILToTensor()(image) for image in crops])
    _, randaugment, _ = create_transform(
        size, is_training=True, auto_augment=RAND_AUGMENT, interpolation="bicubic", color_jitter=None, separate=True
    )
    erasing = RandomErasing(0.25, mode="pixel", device="cpu")

    def draft(record, scale):
        image = Image.open(io.BytesIO(record["bytes"]))
        image.draft("RGB", (image.width // scale, image.height // scale))
        return image.convert("RGB")

    def decode_bytes(record):
        return decode_jpeg(torch.frombuffer(bytearray(record["bytes"]), dtype=torch.uint8))

    def crop_then_tensor_float(image):
        return T.RandomResizedCrop(size)(T.ToTensor()(image))

    split = photograph_split(records)
    untransformed = ImageDataset(split, transform=lambda record: record)

    bicubic = v2.InterpolationMode.BICUBIC
    channels_first_crops = [v2.RandomResizedCrop(size, interpolation=bicubic)(image) for image in uint8]
    channels_last_crops = [ChannelsLastResizedCrop(size, interpolation=bicubic)(image) for image in uint8]
    return [
        ("dataset: Arrow row read, split[i]", range(len(records)), split.__getitem__),
        ("dataset: ImageDataset[i] with no transform", range(len(records)), untransformed.__getitem__),
        ("decode: PIL open + convert RGB", records, open_pil),
        ("decode: torchvision decode_jpeg", records, decode_bytes),
        ("decode: nepa decode_rgb_tensor", records, decode_rgb_tensor),
        ("decode: PIL draft to 1/2 scale (changes the crops)", records, lambda r: draft(r, 2)),
        ("crop: RandomResizedCrop bilinear, PIL", pil, T.RandomResizedCrop(size)),
        ("crop: RandomResizedCrop bicubic, PIL (timm)", pil, T.RandomResizedCrop(size, interpolation=bicubic)),
        ("crop: v2 RandomResizedCrop bilinear, uint8 tensor", uint8, v2.RandomResizedCrop(size, antialias=True)),
        ("crop: v2 RandomResizedCrop bicubic, uint8 tensor", uint8, v2.RandomResizedCrop(size, interpolation=bicubic)),
        ("crop: nepa ChannelsLastResizedCrop bicubic, uint8 tensor", uint8, ChannelsLastResizedCrop(size, interpolation=bicubic)),
        ("to PIL: to_pil_image of a channels-first crop", channels_first_crops, v2.functional.to_pil_image),
        ("to PIL: Image.fromarray of a channels-last crop", channels_last_crops, lambda x: Image.fromarray(x.permute(1, 2, 0).numpy())),
        ("crop: ToTensor, then RandomResizedCrop on float", pil, crop_then_tensor_float),
        ("flip: PIL", crops, lambda image: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        ("flip: uint8 tensor", [T.PILToTensor()(image) for image in crops], v2.functional.horizontal_flip),
        ("to float: ToTensor + Normalize, per image", crops, T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])),
        ("to float: PILToTensor, per image (uint8)", crops, T.PILToTensor()),
        ("to float: BatchNormalize of the uint8 batch", [batch_uint8], BatchNormalize(MEAN, STD)),
        ("collate: default_collate, float", [floats], default_collate),
        ("collate: collate_images, uint8", [[{"pixel_values": x} for x in batch_uint8]], collate_images),
        ("RandAugment (timm), PIL 224", crops, randaugment),
        ("RandomErasing 0.25, per image", floats, erasing),
        ("RandomErasing 0.25, per batch", [torch.stack(floats)], erasing),
    ]


# --- timing ---------------------------------------------------------------------------------------------------------


def measure(function, inputs: list) -> tuple[list, float, float]:
    """(outputs, CPU seconds of this thread, wall seconds) of `function` over `inputs`.

    CPU time of the one thread doing the work is what a worker with a core of its own would take; wall time also
    counts the waits for a core when other processes share the machine."""
    cpu, wall = time.thread_time(), time.perf_counter()
    outputs = [function(x) for x in inputs]
    return outputs, time.thread_time() - cpu, time.perf_counter() - wall


def time_pipelines(
    pipelines: dict, project_datasets: list, batches: list, rounds: int
) -> dict[tuple, list[tuple[float, float]]]:
    """(name, part) -> (cpu, wall) seconds per round, parts "plain", "worker" and "batch step"; all pipelines run once
    per round, interleaved, so that load changes hit all alike. Each round is an epoch of the project's datasets."""
    seconds = defaultdict(list)
    for epoch in range(rounds):
        for dataset in project_datasets:
            dataset.set_epoch(epoch)
        for name, (plain, worker, batch_step) in pipelines.items():
            seconds[(name, "plain")].append(measure(plain, batches)[1:])
            collated, *times = measure(worker, batches)
            seconds[(name, "worker")].append(times)
            seconds[(name, "batch step")].append(measure(batch_step, collated)[1:])
    return seconds


def check_same_output(pipelines: dict, batch: list, size: int) -> None:
    """Both sides of every comparison deliver the same thing: float32 pixels, (batch, 3, size, size)."""
    expected = (torch.float32, (len(batch), 3, size, size))
    for name, (plain, worker, batch_step) in pipelines.items():
        for side, pixels in (("plain", plain(batch)), ("project", batch_step(worker(batch)))):
            if (pixels.dtype, tuple(pixels.shape)) != expected:
                raise RuntimeError(f"{name}, {side}: {pixels.dtype} {tuple(pixels.shape)} instead of {expected}.")


def time_stages(stages: list, rounds: int) -> dict[str, list[tuple[float, float]]]:
    seconds = defaultdict(list)
    for _ in range(rounds):
        for name, inputs, stage in stages:
            seconds[name].append(measure(stage, inputs)[1:])
    return seconds


def images_per_second(images: int, times: list[tuple[float, float]], clock: int) -> float:
    return images / statistics.median(t[clock] for t in times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="photograph variants, a multiple of --batch_size")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=15, help="timed passes over the images; medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads: 1 is one DataLoader worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_stages", action="store_true", help="only the pipeline table")
    args = parser.parse_args()
    if args.images < args.batch_size or args.images % args.batch_size:
        raise SystemExit(f"--images ({args.images}) must be a positive multiple of --batch_size ({args.batch_size}).")

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    records = make_photographs(args.images, args.seed)
    split = photograph_split(records)
    batches = [list(range(i, i + args.batch_size)) for i in range(0, len(records), args.batch_size)]
    sizes = sorted({Image.open(io.BytesIO(r["bytes"])).size for r in records})
    mean_kb = sum(len(r["bytes"]) for r in records) / len(records) / 1024
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {len(records)} JPEGs {sizes}, "
        f"{mean_kb:.0f} KiB on average; batches of {args.batch_size}; {args.rounds} rounds\n"
    )

    print("| augmentation | parameters |\n|---|---|")
    for name, parameters in augmentation_parameters(args.size):
        print(f"| {name} | {parameters} |")
    print()

    pipelines, project_datasets = build_pipelines(args.size, split)
    check_same_output(pipelines, batches[0], args.size)
    seconds = time_pipelines(pipelines, project_datasets, batches, args.rounds)
    print(
        f"| pipeline (one worker, torch threads={args.threads}) | plain img/s | project img/s | project / plain "
        "| project, worker only img/s | worker only / plain | wall clock: project / plain |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    n = len(records)
    for name in pipelines:
        plain, worker = seconds[(name, "plain")], seconds[(name, "worker")]
        project = [(w[0] + b[0], w[1] + b[1]) for w, b in zip(worker, seconds[(name, "batch step")])]
        cpu_plain, cpu_project = images_per_second(n, plain, 0), images_per_second(n, project, 0)
        cpu_worker = images_per_second(n, worker, 0)
        wall_ratio = images_per_second(n, project, 1) / images_per_second(n, plain, 1)
        print(
            f"| {name} | {cpu_plain:.0f} | {cpu_project:.0f} | {cpu_project / cpu_plain:.2f}x "
            f"| {cpu_worker:.0f} | {cpu_worker / cpu_plain:.2f}x | {wall_ratio:.2f}x |"
        )
    print()

    if args.skip_stages:
        return
    stages = build_stages(records[: args.batch_size], args.size)
    seconds = time_stages(stages, args.rounds)
    print(f"| stage (torch threads={args.threads}) | ms per image |\n|---|---:|")
    for name, inputs, _ in stages:
        images = args.batch_size if len(inputs) == 1 else len(inputs)
        print(f"| {name} | {statistics.median(t[0] for t in seconds[name]) / images * 1e3:.3f} |")


if __name__ == "__main__":
    main()
