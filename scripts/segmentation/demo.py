"""Segmentation transfer in miniature, on the CPU (run through scripts/segmentation/demo.sh).

NEPA-pretrain the demo's tiny ViT (configs/pretrain/nepa-tiny-patch7-28, at patch 4) on Fashion-MNIST, then train
UperNet on Fashion-MNIST canvases (`download_dataset.py --dataset fashion-mnist-seg`, 56 px) from that
encoder and from the same encoder at random initialisation, with the same budget, for several seeds.
Every stage calls the project's entry points (`main(argv)`): pretraining in this process, the segmentation
runs in `--jobs` worker processes side by side. The table (mIoU and pixel
accuracy, mean and standard deviation over the seeds) goes to `<output_dir>/results.md`. A second run
reuses every stage whose outputs exist (--rerun to start over).

The seed of a row changes the decoder's initialisation and the batch order (and, for random
initialisation, the encoder's weights); the NEPA encoder is one pretraining run shared by its rows.
"""

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from scripts import miniature  # noqa: E402
from scripts.experiment import Stages, mean_std  # noqa: E402

# The demo's tiny ViT at patch 4, not the classification miniature's 7: on 56 px canvases an item then
# spans 7 x 7 patches instead of 4 x 4; at patch 7 both encoders learned the background only in 250
# steps (mIoU 9.8 % NEPA-pretrained, 10.7 % random init, seed 0).
PATCH_SIZE = 4
LAYER_DECAY = 0.75
COMMON = ["--use_cpu", "True", "--report_to", "none", "--disable_tqdm", "True"]


def segmentation_argv(args, encoder: Path, canvases: Path, run: Path, seed: int) -> list[str]:
    return [
        "--model_name_or_path", str(encoder), "--dataset_name", str(canvases), "--load_from_disk", "True",
        "--output_dir", str(run), "--do_train", "--do_eval", "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "100",
        "--learning_rate", str(args.learning_rate), "--llrd", str(LAYER_DECAY), "--weight_decay", "0.05", "--warmup_steps", "0.1",
        "--lr_scheduler_type", "linear", "--drop_path", "0.1",
        "--decoder_hidden_size", "32", "--auxiliary_channels", "32",
        "--crop_size", str(args.canvas_size), "--train_scale", str(args.canvas_size), str(args.canvas_size),
        "--ratio_range", "1", "1", "--photometric", "False", "--eval_scale", str(args.canvas_size),
        str(args.canvas_size), "--eval_stride", str(args.canvas_size),
        "--logging_steps", "20", "--save_strategy", "no", "--dataloader_num_workers", "0",
        "--seed", str(seed), *COMMON,
    ]  # fmt: skip


def use_one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def timed_segmentation(argv: list[str]) -> float:
    """One train_segmentation.py run in a worker process; its wall time."""
    import train_segmentation

    start = time.time()
    train_segmentation.main(argv)
    return time.time() - start


def build_canvases(folder: Path, canvas_size: int, train: int, validation: int) -> None:
    """Canvases 0..train-1 of the training images and 0..validation-1 of the test images."""
    import download_dataset

    dataset, id2label = download_dataset.build_fashion_mnist_seg(canvas_size=canvas_size, max_per_split=max(train, validation))
    dataset["train"] = dataset["train"].select(range(train))
    dataset["validation"] = dataset["validation"].select(range(validation))
    download_dataset.save(dataset, folder, overwrite=True, id2label=id2label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/segmentation-demo")
    parser.add_argument("--fashion_mnist", default="data/fashion-mnist-hf", help="pretraining images (built if missing)")
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--canvas_size", type=int, default=56)
    parser.add_argument("--train_canvases", type=int, default=2000)
    parser.add_argument("--eval_canvases", type=int, default=300)
    parser.add_argument("--steps", type=int, default=250, help="segmentation steps per run")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-3)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads of the pretraining (default: torch's choice, all cores); on a shared CPU, 1 can be faster",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="segmentation runs side by side (worker processes, one torch thread each)")
    parser.add_argument("--rerun", action="store_true", help="run every stage again")
    args = parser.parse_args()

    import torch

    import download_dataset
    import train_pretrain
    from nepa.segmentation import read_id2label

    if args.threads:
        torch.set_num_threads(args.threads)
    out = REPO / args.output_dir
    if args.rerun and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    start = time.time()

    fashion_mnist = REPO / args.fashion_mnist
    stages.run("Fashion-MNIST", fashion_mnist / "dataset_dict.json", download_dataset.main,
               ["--dataset", "fashion-mnist", "--output_dir", str(fashion_mnist)])  # fmt: skip
    canvases = out / "canvases"
    stages.run("canvases", canvases / "dataset_dict.json", build_canvases,
               canvases, args.canvas_size, args.train_canvases, args.eval_canvases)  # fmt: skip

    pretrained = out / "pretrain"
    argv = miniature.pretrain_argv(pretrained, args.pretrain_steps, dataset=str(fashion_mnist), config_overrides=f"patch_size={PATCH_SIZE}")
    stages.run("NEPA pretraining", pretrained / "model.safetensors", train_pretrain.main, [*argv, "--dataloader_num_workers", "0", *COMMON])

    runs: dict[str, list[Path]] = {"NEPA-pretrained": [], "random init": []}
    pending = []
    for seed in args.seeds:
        random_encoder = out / f"random-init-{seed}"
        if not (random_encoder / "model.safetensors").exists():
            miniature.save_untrained_encoder(random_encoder, seed, patch_size=PATCH_SIZE)
        for row, encoder in (("NEPA-pretrained", pretrained), ("random init", random_encoder)):
            run = out / f"seg-{'nepa' if encoder == pretrained else 'random'}-seed{seed}"
            runs[row].append(run)
            if not (run / "eval_results.json").exists():
                pending.append((f"segmentation, {row}, seed {seed}", segmentation_argv(args, encoder, canvases, run, seed)))
    # Side by side, one torch thread each: on two cores that beat one run at a time on two threads.
    print(f"==> {len(pending)} segmentation runs, {args.jobs} at a time", flush=True)
    segmentation_start = time.time()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=use_one_thread) as pool:
        for (name, _), seconds in zip(pending, pool.map(timed_segmentation, [argv for _, argv in pending])):
            stages.add(name, seconds)
    stages.add(f"segmentation runs, {args.jobs} at a time (wall)", time.time() - segmentation_start)
    results = {row: [json.loads((run / "eval_results.json").read_text()) for run in row_runs] for row, row_runs in runs.items()}
    classes = len(read_id2label(canvases))

    lines = [
        f"# Segmentation transfer in miniature: UperNet on {args.canvas_size} px Fashion-MNIST canvases, on the CPU",
        "",
        f"Encoder {Path(miniature.PRETRAIN_CONFIG).name} at patch {PATCH_SIZE} (NEPA-pretrained {args.pretrain_steps} steps with the settings of "
        f"scripts/miniature.py "
        f"on Fashion-MNIST, or random init); UperNet trained {args.steps} steps at batch {args.batch_size}, lr "
        f"{args.learning_rate} (layer decay {LAYER_DECAY}), on "
        f"{args.train_canvases} canvases; mIoU over {classes} classes (background + {classes - 1}) on {args.eval_canvases} validation "
        f"canvases; mean ± std over seeds {', '.join(map(str, args.seeds))}.",
        "",
        "| encoder | mIoU (%) | pixel accuracy (%) | mIoU per seed |",
        "|---|---|---|---|",
    ]
    for row, runs in results.items():
        ious = [run["eval_mean_iou"] for run in runs]
        accuracies = [run["eval_pixel_accuracy"] for run in runs]
        lines.append(f"| {row} | {mean_std(ious)} | {mean_std(accuracies)} | {' / '.join(f'{100 * v:.1f}' for v in ious)} |")
    lines += ["", "| stage | time |", "|---|---|"]
    lines += [f"| {stage} | {seconds / 60:.1f} min |" for stage, seconds in stages.seconds.items()]
    lines += [f"| total (this run) | {(time.time() - start) / 60:.1f} min |", ""]
    table = "\n".join(lines)
    (out / "results.md").write_text(table)
    print("\n" + table)
    print(f"written to {out / 'results.md'}")


if __name__ == "__main__":
    main()
