"""Does the data path keep a GPU fed? The recipe scripts end to end, against their dataloader alone.

For a machine with a GPU. It makes an image folder of JPEGs at ImageNet-like sizes (500x375 and 375x500,
random crops, flips and colour casts of scikit-learn's two sample photographs, so decoding and cropping cost
about what ImageNet's do), saves it with download_dataset.py, then for each --workers count:

- the dataloader alone: the training split through the recipe's per-image transform and collation, with the
  recipe's per-device batch and that many workers, no model (what the data path can deliver);
- the recipe script itself (scripts/pretrain/nepa_b.sh, then scripts/finetune/nepa_b_sft.sh on the converted
  pretraining output) for --steps optimiser steps with TOTAL_BATCH equal to the per-device batch (one GPU, no
  gradient accumulation), reading the `images_per_second` the Trainer logs every 10 steps: the median of the
  intervals after the first --skip_logs (compilation, warm-up).

Compare the end-to-end figure with `python -m bench.train_step --device cuda` (the model alone, same batch): at 90 % or
more, the data path keeps up. Nothing here asserts on time.

    python -m bench.end_to_end --workers 8,16 --steps 200
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import cache
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nepa.data import RAND_AUGMENT, FinetuneTransform, ImageDataset, RandomCropFlip, collate_images, get_split

ROOT = Path(__file__).resolve().parents[1]

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
# What the two recipe scripts train, with their per-device batch on an 80 GB GPU and their per-image transform.
STAGES = {
    "pretrain": dict(script="scripts/pretrain/nepa_b.sh", batch=256),
    "finetune": dict(script="scripts/finetune/nepa_b_sft.sh", batch=128),
}


@cache
def sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def make_jpeg(job: tuple[int, str, int]) -> None:
    index, path, quality = job
    rng = np.random.default_rng(index)
    photos = sample_photos()
    photo = photos[index % len(photos)]
    height, width = photo.shape[:2]
    scale = rng.uniform(0.35, 1.0)
    crop_h, crop_w = int(height * scale), int(width * scale)
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    crop = photo[top : top + crop_h, left : left + crop_w].astype(np.float32) * rng.uniform(0.7, 1.3, size=3)
    size = (500, 375) if rng.random() < 0.75 else (375, 500)  # ImageNet is mostly landscape
    image = Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image.save(path, quality=quality)


def make_image_folder(folder: Path, train_images: int, val_images: int, classes: int = 10) -> None:
    jobs = []
    for split, count in (("train", train_images), ("val", val_images)):
        for index in range(count):
            class_dir = folder / split / f"class_{index % classes:02d}"
            class_dir.mkdir(parents=True, exist_ok=True)
            jobs.append((len(jobs), str(class_dir / f"{index:06d}.jpg"), 90))
    with Pool(os.cpu_count()) as pool:
        pool.map(make_jpeg, jobs, chunksize=64)


def loader_images_per_second(stage: str, dataset_dir: Path, workers: int, batches: int) -> float:
    """Images/s of the training split through the stage's transform and collation, `batches` batches timed
    after `workers` batches of warm-up; epochs are chained with the workers kept alive."""
    import datasets

    split = get_split(datasets.load_from_disk(str(dataset_dir)), "train")
    if stage == "pretrain":
        dataset = ImageDataset(split, RandomCropFlip(IMAGE_SIZE), label_column=None, seed=0)
    else:
        dataset = ImageDataset(split, FinetuneTransform(IMAGE_SIZE, RAND_AUGMENT, IMAGENET_MEAN), seed=0)
    batch = STAGES[stage]["batch"]
    loader = torch.utils.data.DataLoader(
        dataset, batch, shuffle=True, num_workers=workers, collate_fn=collate_images, pin_memory=True,
        drop_last=True, persistent_workers=workers > 0,
    )

    def batches_forever():
        while True:
            yield from loader

    stream = batches_forever()
    for _ in range(max(workers, 1)):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch / (time.perf_counter() - start)


def run_recipe(stage: str, workers: int, steps: int, data_dir: Path, output_dir: Path, model: Path | None) -> None:
    batch = STAGES[stage]["batch"]
    env = dict(os.environ, NUM_WORKERS=str(workers), TOTAL_BATCH=str(batch), PER_DEVICE_BATCH=str(batch),
               DATA_DIR=str(data_dir), OUTPUT_DIR=str(output_dir), REPORT_TO="none",
               KNN_EVAL_STEPS="0")  # the training's throughput alone: no k-NN monitor (its cost: docs/performance.md)
    flags = ["--max_steps", str(steps), "--logging_steps", "10", "--save_strategy", "no"]
    if stage == "finetune":
        env["MODEL"] = str(model)
        flags += ["--do_eval", "False", "--eval_strategy", "no", "--load_best_model_at_end", "False"]
    subprocess.run(["bash", STAGES[stage]["script"], *flags], cwd=ROOT, env=env, check=True)


def logged_images_per_second(output_dir: Path, skip_logs: int) -> tuple[float, int]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    rates = [entry["images_per_second"] for entry in history if "images_per_second" in entry][skip_logs:]
    if not rates:
        raise SystemExit(f"{output_dir}: fewer than {skip_logs + 1} logged intervals; raise --steps.")
    return statistics.median(rates), len(rates)


def convert(pretrained: Path, data_dir: Path, destination: Path) -> None:
    subprocess.run(
        [sys.executable, "init_nepa_cls_from_pretrain.py", "--pretrained_model_id", str(pretrained),
         "--config_model_id", "configs/finetune/nepa-base-patch14-224-sft", "--dataset_name", str(data_dir),
         "--save_local", "--local_dir", str(destination)],
        cwd=ROOT, check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="8,16", help="comma-separated dataloader worker counts")
    parser.add_argument("--stages", default="pretrain,finetune", help=f"comma-separated from {', '.join(STAGES)}")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps of each recipe run")
    parser.add_argument("--skip_logs", type=int, default=3, help="logged intervals (10 steps each) left out as warm-up")
    parser.add_argument("--loader_batches", type=int, default=40, help="timed batches of the dataloader alone")
    parser.add_argument("--train_images", type=int, default=8192)
    parser.add_argument("--work_dir", type=Path, default=ROOT / "outputs" / "bench-end-to-end")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/end_to_end.py measures a GPU run and torch sees no GPU; use `python -m bench.data_pipeline` here.")
    workers = [int(w) for w in args.workers.split(",")]
    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}.")

    folder, data_dir = args.work_dir / "jpegs", args.work_dir / "data"
    if not (data_dir / "dataset_dict.json").is_file():
        started = time.perf_counter()
        make_image_folder(folder, args.train_images, 512)
        subprocess.run([sys.executable, "download_dataset.py", "--imagefolder", str(folder), "--output_dir", str(data_dir),
                        "--overwrite"], cwd=ROOT, check=True)
        print(f"# made {args.train_images} + 512 JPEGs and the dataset in {time.perf_counter() - started:.0f} s", flush=True)

    rows = []
    for stage in stages:
        for count in workers:
            loader = loader_images_per_second(stage, data_dir, count, args.loader_batches)
            print(f"# {stage}, {count} workers: dataloader alone {loader:.0f} images/s", flush=True)
            output_dir = args.work_dir / f"{stage}-w{count}"
            model = args.work_dir / "classifier"
            if stage == "finetune" and not model.is_dir():
                convert(args.work_dir / f"pretrain-w{workers[0]}", data_dir, model)
            started = time.perf_counter()
            run_recipe(stage, count, args.steps, data_dir, output_dir, model)
            trained, intervals = logged_images_per_second(output_dir, args.skip_logs)
            print(f"# {stage}, {count} workers: recipe {trained:.0f} images/s ({time.perf_counter() - started:.0f} s)",
                  flush=True)
            rows.append((stage, count, loader, trained, intervals))

    print(f"\nDevice: {torch.cuda.get_device_name()}; {os.cpu_count()} CPUs; torch {torch.__version__}; "
          f"{args.steps} steps per run, median of the last {rows[0][4] if rows else 0} logged intervals.\n")
    print("| stage | per-device batch | workers | dataloader alone images/s | recipe end to end images/s |")
    print("|---|---|---|---|---|")
    for stage, count, loader, trained, _ in rows:
        print(f"| {stage} | {STAGES[stage]['batch']} | {count} | {loader:.0f} | {trained:.0f} |")


if __name__ == "__main__":
    main()
