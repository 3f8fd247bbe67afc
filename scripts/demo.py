"""The paper's pipeline in miniature, on Fashion-MNIST and the CPU (run through scripts/demo.sh).

NEPA-pretrain a small causal ViT, then compare it with the same ViT at random initialisation:
k-NN and linear probes of the frozen encoders, and the same fine-tuning budget from each. Every stage
runs the project's own entry points; the results table goes to outputs/demo/results.md.
A second run reuses every stage whose outputs exist (--rerun to start over).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRETRAIN_CONFIG = REPO / "configs/pretrain/nepa-tiny-patch4-28"
FINETUNE_CONFIG = REPO / "configs/finetune/nepa-tiny-patch4-28-sft"
COMMON = ["--use_cpu", "True", "--report_to", "none", "--seed", "0"]
# A 0.9999 average over a few hundred steps is mostly the initial weights: the demo trains without one.
NO_EMA = ["--use_ema", "False"]


def run_stage(name: str, done_marker: Path, command: list[str], timings: dict, rerun: bool) -> None:
    """Run one entry point unless its output already exists; record its wall time."""
    if done_marker.exists() and not rerun:
        print(f"==> {name}: reusing {done_marker.parent}")
        timings.setdefault(name, None)
        return
    print(f"==> {name}: {' '.join(command)}", flush=True)
    start = time.time()
    subprocess.run([sys.executable, *command], cwd=REPO, check=True)
    timings[name] = time.time() - start


def save_random_encoder(folder: Path) -> None:
    """The baseline: the same architecture, never trained, saved like a pretraining output."""
    import torch
    from transformers import AutoImageProcessor

    from models.vit_nepa import ViTNepaConfig, ViTNepaForPreTraining

    torch.manual_seed(0)
    ViTNepaForPreTraining(ViTNepaConfig.from_pretrained(PRETRAIN_CONFIG)).save_pretrained(folder)
    AutoImageProcessor.from_pretrained(PRETRAIN_CONFIG).save_pretrained(folder)


def accuracy(folder: Path) -> float:
    return json.loads((folder / "eval_results.json").read_text())["eval_accuracy"]


def minutes(seconds: float | None) -> str:
    return "reused" if seconds is None else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/fashion-mnist-hf")
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--pretrain_steps", type=int, default=1000)
    parser.add_argument("--finetune_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--probe_train_samples", type=int, default=10000)
    parser.add_argument("--eval_samples", type=int, default=2000)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--rerun", action="store_true", help="run every stage again")
    args = parser.parse_args()

    out = REPO / args.output_dir
    if args.rerun and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = ["--dataset_name", args.dataset, "--load_from_disk", "True"]
    loader = ["--dataloader_num_workers", str(args.num_workers)]
    timings: dict[str, float | None] = {}
    start = time.time()

    if not (REPO / args.dataset / "dataset_dict.json").exists():
        run_stage("dataset", REPO / args.dataset / "dataset_dict.json",
                  ["download_dataset.py", "--dataset", "fashion-mnist", "--output_dir", args.dataset], timings, True)

    encoders = {"NEPA-pretrained": out / "pretrain", "random init": out / "random-init"}
    run_stage("NEPA pretraining", encoders["NEPA-pretrained"] / "model.safetensors", [
        "train_pretrain.py", "--config_name", str(PRETRAIN_CONFIG), *dataset,
        "--output_dir", str(encoders["NEPA-pretrained"]), "--do_train", "--max_steps", str(args.pretrain_steps),
        "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", "1.5e-3",
        "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05", "--weight_decay", "0.05",
        "--adam_beta2", "0.95", "--logging_steps", "50", "--save_strategy", "no", *NO_EMA, *loader, *COMMON,
    ], timings, args.rerun)
    if not (encoders["random init"] / "model.safetensors").exists() or args.rerun:
        save_random_encoder(encoders["random init"])

    results: dict[str, dict[str, float]] = {}
    for row, encoder in encoders.items():
        slug = encoder.name
        results[row] = {}
        for protocol in ("knn", "linear"):
            folder = out / f"{protocol}-{slug}"
            run_stage(f"{protocol} probe ({row})", folder / "eval_results.json", [
                "eval.py", "--model_name_or_path", str(encoder), "--protocol", protocol, *dataset,
                "--max_train_samples", str(args.probe_train_samples), "--max_eval_samples", str(args.eval_samples),
                "--output_dir", str(folder), "--per_device_eval_batch_size", "256", *loader, *COMMON,
            ], timings, args.rerun)
            results[row][protocol] = accuracy(folder)

        classifier, finetuned = out / f"cls-{slug}", out / f"finetune-{slug}"
        run_stage(f"convert ({row})", classifier / "model.safetensors", [
            "init_nepa_cls_from_pretrain.py", "--pretrained_model_id", str(encoder),
            "--config_model_id", str(FINETUNE_CONFIG), "--save_local", "--local_dir", str(classifier),
        ], timings, args.rerun)
        run_stage(f"fine-tuning ({row})", finetuned / "eval_results.json", [
            "train_finetune.py", "--model_name_or_path", str(classifier), *dataset,
            "--output_dir", str(finetuned), "--do_train", "--do_eval", "--max_steps", str(args.finetune_steps),
            "--max_eval_samples", str(args.eval_samples), "--per_device_train_batch_size", str(args.batch_size),
            "--per_device_eval_batch_size", "256", "--learning_rate", "2e-3", "--head_lr", "2e-3", "--llrd", "0.75",
            "--warmup_steps", "0.1", "--weight_decay", "0.05", "--drop_path", "0.1", "--crop_pct", "1.0",
            # The paper's recipe, lightened for a few hundred steps on 28-pixel images.
            "--aa", "rand-m5-mstd0.5-inc1", "--reprob", "0.1", "--mixup", "0.2", "--cutmix", "0",
            "--smoothing", "0.1", "--logging_steps", "50", "--save_strategy", "no", *NO_EMA, *loader, *COMMON,
        ], timings, args.rerun)
        results[row]["finetuned"] = accuracy(finetuned)

    lines = [
        f"# NEPA demo: Fashion-MNIST, {PRETRAIN_CONFIG.name} on the CPU",
        "",
        f"Pretraining {args.pretrain_steps} steps, fine-tuning {args.finetune_steps} steps (batch {args.batch_size}); "
        f"probes on {args.probe_train_samples} training images; top-1 on {args.eval_samples} validation images.",
        "",
        "| encoder | k-NN top-1 | linear probe top-1 | fine-tuned top-1 |",
        "|---|---|---|---|",
    ]
    for row, values in results.items():
        lines.append(f"| {row} | {values['knn']:.2%} | {values['linear']:.2%} | {values['finetuned']:.2%} |")
    lines += ["", "| stage | time |", "|---|---|"]
    lines += [f"| {stage} | {minutes(seconds)} |" for stage, seconds in timings.items()]
    lines += [f"| total (this run) | {minutes(time.time() - start)} |", ""]
    table = "\n".join(lines)
    (out / "results.md").write_text(table)
    print("\n" + table)
    print(f"written to {out / 'results.md'}")


if __name__ == "__main__":
    main()
