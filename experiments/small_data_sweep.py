"""The measurement behind scripts/finetune/custom.sh's small-data defaults (docs/recipes.md), in miniature.

    python -m experiments.small_data_sweep --jobs 2        # -> outputs/small-data-sweep/results.md and .json
    python -m experiments.small_data_sweep --print docs/figures/small_data_sweep.json   # a saved table, printed

A "custom dataset" of a few thousand images is written as an image folder (Fashion-MNIST: --per_class training
images of each class from its training split, --val_per_class from its test split) and goes the way custom.sh
takes a user's folder: download_dataset.py --imagefolder, init_nepa_cls_from_pretrain.py --dataset_name (the
class count from the data), train_finetune.py. The encoder is the demo's tiny ViT, NEPA-pretrained on the
Fashion-MNIST training images of --dataset (all 60,000 by default; --pretrain_steps steps with the settings of
experiments/miniature.py). Each fine-tune runs in its own single-threaded process, --jobs at a time, its output in
runs/<run>.log, and the table of top-1 on the validation folder (mean ± std over --seeds) is printed and written
to OUTPUT/results.md. The table holds every fine-tune in OUTPUT, so that the runs of several calls (one grid
each) add up to one table; OUTPUT/results.json keeps them, with the commit and command of every call that
added to it. A second run reuses every stage whose results exist.
"""

import argparse
import json
from pathlib import Path

from experiments import miniature
from experiments.runner import (
    CPU_FLAGS, REPO, Stages, ensure_dataset, mean_std, print_saved_table, provenance, run_entry_point,
)  # fmt: skip
from nepa.data import RAND_AUGMENT

# Augmentation strengths. "none": the whole image and a flip. "light": crops of at least 35 % of the image,
# RandAugment at magnitude 5, label smoothing. "full": the ImageNet recipe's augmentation (recipe.sh).
AUGMENTATION = {
    "none": dict(crop_scale=(1.0, 1.0), aa="", reprob=0, mixup=0, cutmix=0, smoothing=0.0),
    "light": dict(crop_scale=(0.35, 1.0), aa="rand-m5-mstd0.5-inc1", reprob=0, mixup=0, cutmix=0, smoothing=0.1),
    "full": dict(crop_scale=(0.08, 1.0), aa=RAND_AUGMENT, reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1),
}
# What the sweep holds fixed: the release's fine-tuning structure (layer decay 0.65, frozen patch projection,
# drop path 0.1, AdamW wd 0.05, bidirectional) at batch 64, warm-up 10 %, no EMA (a few thousand steps).
FIXED = dict(
    per_device_train_batch_size=64, llrd=0.65, freeze_embed=True, drop_path=0.1, weight_decay=0.05,
    warmup_steps=0.1, use_ema=False, crop_pct=1.0, per_device_eval_batch_size=500,
)
FLAGS = [*CPU_FLAGS, "--disable_tqdm", "True"]  # each run's output goes to its log


def write_image_folder(root: Path, per_class: int, val_per_class: int) -> Path:
    """PNG files in root/train/<class>/ and root/val/<class>/: the first images of each class of each split."""
    import download_dataset
    from PIL import Image

    if (root / "val").is_dir():
        return root
    source = download_dataset.FASHION_MNIST_DEBIAN_DIR
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
    for split, prefix, count in (("train", "train", per_class), ("val", "t10k", val_per_class)):
        images = download_dataset.read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        labels = download_dataset.read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        written = [0] * len(names)
        for image, label in zip(images, labels):
            if written[label] < count:
                folder = root / split / names[label]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).convert("RGB").save(folder / f"{written[label]:05d}.png")
                written[label] += 1
    return root


def finetune_stage(classifier: Path, dataset: Path, output_dir: Path, aug: str, lr: float, epochs: int, seed: int) -> tuple:
    """The stage of one fine-tune of the sweep (for Stages.run_side_by_side), in a single-threaded process."""
    settings = {**FIXED, **AUGMENTATION[aug], "learning_rate": lr, "num_train_epochs": epochs, "seed": seed}
    argv = [
        "train_finetune.py", "--model_name_or_path", str(classifier), "--dataset_name", str(dataset),
        "--load_from_disk", "True", "--output_dir", str(output_dir), "--do_train", "--do_eval",
        *FLAGS, "--save_strategy", "no", "--logging_steps", "50", *miniature.flags(settings),
    ]  # fmt: skip
    log = output_dir.parent / f"{output_dir.name}.log"
    return (f"fine-tuning, {aug}, lr {lr:g}, {epochs} epochs", output_dir / "eval_results.json", run_entry_point, argv, log, 1, False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=REPO / "outputs" / "small-data-sweep")
    parser.add_argument("--dataset", default=miniature.DATASET, help="the pretraining images (built if missing)")
    parser.add_argument("--per_class", type=int, default=200)
    parser.add_argument("--val_per_class", type=int, default=100)
    parser.add_argument("--pretrain_steps", type=int, default=miniature.PRETRAIN_STEPS)
    parser.add_argument("--augmentations", nargs="+", default=list(AUGMENTATION), choices=list(AUGMENTATION))
    parser.add_argument("--learning_rates", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--print", metavar="FILE", help="print the table of a results.json this study wrote, and stop")
    return parser.parse_args(argv)


def prepare(args, stages: Stages, out: Path) -> tuple[Path, Path]:
    """The image folder as a dataset, and the NEPA-pretrained encoder converted to its classifier."""
    import download_dataset

    images = write_image_folder(out / "images", args.per_class, args.val_per_class)
    dataset = out / "images-hf"
    stages.run("dataset", dataset / "dataset_dict.json", download_dataset.main,
               ["--imagefolder", str(images), "--output_dir", str(dataset)])  # fmt: skip
    fashion = ensure_dataset(args.dataset, stages)
    encoder, classifier = out / "encoder", out / "classifier"
    pretrain = miniature.pretrain_argv(encoder, args.pretrain_steps, dataset=fashion, logging_steps=500)
    stages.run("NEPA pretraining", encoder / "model.safetensors", run_entry_point,
               ["train_pretrain.py", *pretrain, *FLAGS], out / "encoder.log", 1, False)  # fmt: skip
    stages.run("conversion", classifier / "model.safetensors", run_entry_point,
               ["init_nepa_cls_from_pretrain.py", *miniature.convert_argv(encoder, classifier, dataset=dataset)],
               out / "classifier.log", 1, False)  # fmt: skip
    return dataset, classifier


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.print:
        return table(print_saved_table(args.print, table))
    measured_by = provenance("experiments.small_data_sweep", argv)  # the code as the run starts
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    dataset, classifier = prepare(args, stages, out)
    runs = [
        (aug, lr, epochs, seed)
        for epochs in args.epochs for aug in args.augmentations for lr in args.learning_rates for seed in range(args.seeds)
    ]  # fmt: skip
    folders = [out / "runs" / "-".join(map(str, run)) for run in runs]
    stages.run_side_by_side(args.jobs, [finetune_stage(classifier, dataset, folder, *run) for folder, run in zip(folders, runs)])

    earlier = json.loads((out / "results.json").read_text())["calls"] if (out / "results.json").exists() else []
    calls = earlier + ([measured_by] if measured_by not in earlier else [])
    results = {"calls": calls, "pretrain_steps": args.pretrain_steps, "runs": finished_runs(out / "runs")}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return text


def finished_runs(folder: Path) -> list[dict]:
    """Every fine-tune of the sweep's output folder that has its result, by (epochs, augmentation, lr, seed)."""
    runs = []
    for result in folder.glob("*/eval_results.json"):
        aug, rest = result.parent.name.split("-", 1)
        lr, epochs, seed = rest.rsplit("-", 2)  # a learning rate may be written 1e-05
        accuracy = json.loads(result.read_text())["eval_accuracy"]
        runs.append(dict(epochs=int(epochs), augmentation=aug, lr=float(lr), seed=int(seed), accuracy=accuracy))
    return sorted(runs, key=lambda run: (run["epochs"], list(AUGMENTATION).index(run["augmentation"]), run["lr"], run["seed"]))


def table(results: dict) -> str:
    """Top-1 of each (epochs, augmentation, lr), mean ± std over its seeds, from what results.json holds."""
    cells: dict[tuple, list[float]] = {}
    for run in results["runs"]:
        cells.setdefault((run["epochs"], run["augmentation"], run["lr"]), []).append(run["accuracy"])
    lines = ["| epochs | augmentation | lr (batch 64) | top-1 (%) | seeds |", "|---|---|---|---|---|"]
    lines += [f"| {epochs} | {aug} | {lr:g} | {mean_std(values)} | {len(values)} |" for (epochs, aug, lr), values in cells.items()]
    return "\n".join(lines)

if __name__ == "__main__":
    main()
