"""The demo's training stages on the CPU, per-image data path against `--images_in_memory`, in one process.

    .venv/bin/python -m bench.small_images --threads 1              # ~6 min on the 2-core CPU
    .venv/bin/python -m bench.small_images --threads 1 --profile    # adds the top operators of each model step

At the demo's settings (experiments/miniature.py: the tiny patch-7 ViT on 28 px Fashion-MNIST, pretraining batch 128
on crops of half the image or more, fine-tuning batch 64 on whole images and flips of 10 % of the labels), for
pretraining and fine-tuning, and for each data path:

- data alone: batches through the path's DataLoader (the per-image `ImageDataset` with `--workers` worker
  processes, as the demo ran it; the in-memory split with none), no model;
- model step alone: `BatchNormalize`, forward, backward, AdamW and zero_grad on a batch already in memory;
- end to end: the DataLoader feeding the model step, as the Trainer does it;
- the one-off cost of the in-memory path: decoding the split into one tensor.

Rounds alternate the two paths and medians are printed, so that other load on the cores moves both alike. The
Trainer's own overhead (callbacks, logging) is in neither; the demo's stage times in docs/performance.md have it.
"""

import argparse
import statistics
import time
from pathlib import Path

import datasets
import torch

from experiments import miniature
from models.vit_nepa import ViTNepaConfig, ViTNepaForImageClassification, ViTNepaForPreTraining
from nepa import data

ROOT = Path(__file__).resolve().parents[1]

MEAN = STD = (0.5, 0.5, 0.5)


def stages(dataset: datasets.DatasetDict) -> dict:
    """name -> (training split, transform, batch size, model class, config folder), as the demo trains them."""
    pretrain, finetune = miniature.PRETRAIN, miniature.FINETUNE
    return {
        "pretraining": (
            dataset["train"], data.RandomCropFlip(28, pretrain["crop_scale"]), pretrain["per_device_train_batch_size"],
            ViTNepaForPreTraining, miniature.PRETRAIN_CONFIG,
        ),
        "fine-tuning, 10 % labels": (
            data.labelled_subset(dataset["train"], 0.1, 0),
            data.FinetuneTransform(28, finetune["aa"], MEAN, finetune["crop_scale"], finetune["crop_ratio"]),
            finetune["per_device_train_batch_size"], ViTNepaForImageClassification, miniature.FINETUNE_CONFIG,
        ),
    }  # fmt: skip


class Step:
    """One optimiser step of a fresh model on a uint8 batch, the Trainer's order of work."""

    def __init__(self, model_class, config_folder: str):
        torch.manual_seed(0)
        self.model = model_class(ViTNepaConfig.from_pretrained(ROOT / config_folder)).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        self.normalize = data.BatchNormalize(MEAN, STD)
        self.takes_labels = model_class is ViTNepaForImageClassification

    def __call__(self, batch: dict) -> None:
        labels = {"labels": batch["labels"]} if self.takes_labels else {}
        self.model(pixel_values=self.normalize(batch["pixel_values"]), **labels).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def run_loader(loader, batches: int, step=None) -> None:
    for index, batch in enumerate(loader):
        if step is not None:
            step(batch)
        if index + 1 == batches:
            return


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT / miniature.DATASET))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the per-image path (the demo's: 1)")
    parser.add_argument("--batches", type=int, default=10, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print the top operators of each stage's model step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = datasets.load_from_disk(args.dataset)
    print(f"torch threads {args.threads}, per-image path with {args.workers} worker(s); {args.batches} batches per "
          f"round, median of {args.rounds} rounds; load average before: {open('/proc/loadavg').read().split()[0]}\n")  # fmt: skip
    rows = []
    for name, (split, transform, batch_size, model_class, config) in stages(dataset).items():
        start = time.perf_counter()
        in_memory = data.ImagesInMemory(split, transform, label_column="label", seed=0)
        decode = time.perf_counter() - start
        per_image = data.ImageDataset(split, transform, seed=0)
        loaders = {
            "per image": lambda: torch.utils.data.DataLoader(
                per_image, batch_size=batch_size, shuffle=True, collate_fn=data.collate_images, num_workers=args.workers
            ),
            "in memory": lambda: torch.utils.data.DataLoader(
                in_memory, batch_size=batch_size, shuffle=True, collate_fn=data.collate_images, num_workers=0
            ),
        }
        step = Step(model_class, config)
        batch = next(iter(loaders["in memory"]()))
        for _ in range(3):
            step(batch)
        seconds = {(path, part): [] for path in loaders for part in ("data", "model", "end to end")}
        for _ in range(args.rounds):
            for path, loader in loaders.items():
                seconds[path, "data"].append(timed(run_loader, loader(), args.batches))
                seconds[path, "model"].append(timed(lambda: [step(batch) for _ in range(args.batches)]))
                seconds[path, "end to end"].append(timed(run_loader, loader(), args.batches, step))
        rate = {key: args.batches * batch_size / statistics.median(values) for key, values in seconds.items()}
        for part in ("data", "model", "end to end"):
            rows.append((name, part, rate["per image", part], rate["in memory", part]))
        print(f"{name}: decoding {len(split)} images into memory took {decode:.1f} s", flush=True)
        for part in ("data", "model", "end to end"):
            print(f"  {part}: per image {rate['per image', part]:.0f} img/s, in memory {rate['in memory', part]:.0f} img/s", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                for _ in range(5):
                    step(batch)
            print(f"{name}, model step, top operators over 5 steps:")
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print("\n| stage | part | per-image path img/s | in-memory path img/s | in memory / per image |")
    print("|---|---|---:|---:|---:|")
    for name, part, old, new in rows:
        print(f"| {name} | {part} | {old:.0f} | {new:.0f} | {new / old:.2f}x |")
    print(f"\nload average after: {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
