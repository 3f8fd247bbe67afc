"""Segmentation transfer in miniature, on the CPU (run through scripts/segmentation/demo.sh).

    python -m experiments.segmentation_demo --jobs 2        # -> outputs/segmentation-demo/results.md

NEPA-pretrain the demo's tiny ViT (configs/pretrain/nepa-tiny-patch7-28, at patch 4) on Fashion-MNIST, then train
UperNet on Fashion-MNIST canvases (`download_dataset.py --dataset fashion-mnist-seg`, 56 px) from that
encoder and from the same encoder at random initialisation, with the same budget, for several seeds.
The pretraining runs in this process (`train_pretrain.main(argv)`), the segmentation runs as
`train_segmentation.py` processes of their own, `--jobs` side by side, each keeping its output in
`<output_dir>/<run>.log`. The table (mIoU and pixel accuracy, mean and standard deviation over the seeds) goes to
`<output_dir>/results.md`. A second run reuses every stage whose outputs exist (--rerun to start over).

The seed of a row changes the decoder's initialisation and the batch order (and, for random
initialisation, the encoder's weights); the NEPA encoder is one pretraining run shared by its rows.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from experiments import miniature
from experiments.runner import CPU_FLAGS, REPO, Stages, add_threads_flag, ensure_dataset, mean_std, run_entry_point, use_threads

# The demo's tiny ViT at patch 4, not the classification miniature's 7: on 56 px canvases an item then
# spans 7 x 7 patches instead of 4 x 4; at patch 7 both encoders learned the background only in 250
# steps (mIoU 9.8 % NEPA-pretrained, 10.7 % random init, seed 0).
PATCH_SIZE = 4
LAYER_DECAY = 0.75
FLAGS = [*CPU_FLAGS, "--disable_tqdm", "True"]


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
        "--logging_steps", "20", "--save_strategy", "no",
        "--seed", str(seed), *FLAGS,
    ]  # fmt: skip


def build_canvases(folder: Path, canvas_size: int, train: int, validation: int) -> None:
    """Canvases 0..train-1 of the training images and 0..validation-1 of the test images."""
    import download_dataset

    dataset, id2label = download_dataset.build_fashion_mnist_seg(canvas_size=canvas_size, max_per_split=max(train, validation))
    dataset["train"] = dataset["train"].select(range(train))
    dataset["validation"] = dataset["validation"].select(range(validation))
    download_dataset.save(dataset, folder, overwrite=True, id2label=id2label)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/segmentation-demo")
    parser.add_argument("--fashion_mnist", default=miniature.DATASET, help="pretraining images (built if missing)")
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--canvas_size", type=int, default=56)
    parser.add_argument("--train_canvases", type=int, default=2000)
    parser.add_argument("--eval_canvases", type=int, default=300)
    parser.add_argument("--steps", type=int, default=250, help="segmentation steps per run")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-3)
    add_threads_flag(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="segmentation runs side by side (processes, one torch thread each)")
    parser.add_argument("--rerun", action="store_true", help="run every stage again")
    return parser.parse_args(argv)


def prepare(args, stages: Stages, out: Path) -> tuple[Path, Path]:
    """The canvases and the NEPA-pretrained encoder (on the Fashion-MNIST images, built when missing)."""
    import train_pretrain

    fashion_mnist = ensure_dataset(args.fashion_mnist, stages, flag="--fashion_mnist")
    canvases = out / "canvases"
    stages.run("canvases", canvases / "dataset_dict.json", build_canvases,
               canvases, args.canvas_size, args.train_canvases, args.eval_canvases)  # fmt: skip
    pretrained = out / "pretrain"
    argv = miniature.pretrain_argv(pretrained, args.pretrain_steps, dataset=fashion_mnist, config_overrides=f"patch_size={PATCH_SIZE}")
    stages.run("NEPA pretraining", pretrained / "model.safetensors", train_pretrain.main, [*argv, *FLAGS])
    return canvases, pretrained


def segment(args, stages: Stages, out: Path, canvases: Path, pretrained: Path) -> dict[str, list[dict]]:
    """Each row's UperNet runs, --jobs side by side (one torch thread each: on two cores that beat one run at a
    time on two threads); each row's eval results, seed by seed."""
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
                argv = ["train_segmentation.py", *segmentation_argv(args, encoder, canvases, run, seed)]
                pending.append((f"segmentation, {row}, seed {seed}", run / "eval_results.json", run_entry_point,
                                argv, out / f"{run.name}.log", 1, False))  # fmt: skip
    print(f"==> {len(pending)} segmentation runs, {args.jobs} at a time", flush=True)
    start = time.time()
    stages.run_side_by_side(args.jobs, pending)
    stages.add(f"segmentation runs, {args.jobs} at a time (wall)", time.time() - start)
    return {row: [json.loads((run / "eval_results.json").read_text()) for run in row_runs] for row, row_runs in runs.items()}


def table(args, stages: Stages, results: dict[str, list[dict]], classes: int, total_seconds: float) -> str:
    """mIoU and pixel accuracy of each row over the seeds, and the time of each stage."""
    lines = [
        f"# Segmentation transfer in miniature: UperNet on {args.canvas_size} px Fashion-MNIST canvases, on the CPU",
        "",
        f"Encoder {Path(miniature.PRETRAIN_CONFIG).name} at patch {PATCH_SIZE} (NEPA-pretrained {args.pretrain_steps} steps with the settings of "
        f"experiments/miniature.py "
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
    lines += [f"| total (this run) | {total_seconds / 60:.1f} min |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    from nepa.segmentation import read_id2label

    use_threads(args.threads)
    out = REPO / args.output_dir
    if args.rerun and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stages, start = Stages(), time.time()
    canvases, pretrained = prepare(args, stages, out)
    results = segment(args, stages, out, canvases, pretrained)
    text = table(args, stages, results, len(read_id2label(canvases)), time.time() - start)
    (out / "results.md").write_text(text)
    print("\n" + text)
    print(f"written to {out / 'results.md'}")
    return text


if __name__ == "__main__":
    main()
