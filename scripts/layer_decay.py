"""Does the paper's layer-decay ramp help in miniature? Constant decay, the ramp, and no decay, fine-tuned alike.

    python scripts/layer_decay.py --threads 1                          # pretrain, convert, 18 fine-tunes, the table
    python scripts/layer_decay.py --table docs/figures/layer_decay.json   # the table of the committed results

One NEPA pretraining of the demo's model under the miniature's settings (scripts/miniature.py, --pretrain_steps
under one cosine schedule), converted to a classifier (its final weights, or with --encoder_step a checkpoint of
that schedule), then fine-tuned the demo's way (scripts/miniature.finetune_argv: 1 % and 10 % of the labels,
--seeds label subsets and fine-tuning seeds) under three layer-wise lr decays (SCHEDULES): the release scripts'
constant 0.65 (`llrd_cosine_warmup`, each group warmed up over its own steps), the paper's ramp from 0.35 to 1.0
(`llrd_cosine`, one warm-up for every group), and none (1.0, the miniature's own protocol). Each seed's three
fine-tunes see the same labelled images, so the table also gives the ramp's gain over the constant decay paired
by seed. A stage whose result exists is reused; every run writes <output_dir>/final/results.json (with
--encoder_step N: step<N>/results.json) with the commit and the command that produced it.
"""
import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts import demo, miniature  # noqa: E402
from scripts.experiment import mean_std, print_saved_table, provenance  # noqa: E402
from scripts.pretraining_length import TimedStages, checkpoint, seconds  # noqa: E402

# train_finetune.py's flags for each schedule, after the miniature's (whose --llrd is 1.0).
SCHEDULES = {
    "constant 0.65 (release scripts)": ["--llrd", "0.65"],
    "ramp 0.35 -> 1.0 (paper)": ["--llrd", "0.35", "--llrd_end", "1.0"],
    "none (1.0, the miniature's)": ["--llrd", "1.0"],
}
CONSTANT, RAMP = list(SCHEDULES)[:2]
SAVE_STEPS = 1000  # pretraining checkpoints, so that an interrupted pretraining resumes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=miniature.DATASET)
    parser.add_argument("--output_dir", default="outputs/layer_decay")
    parser.add_argument("--pretrain_steps", type=int, default=4000, help="the length of the pretraining's cosine schedule")
    parser.add_argument(
        "--encoder_step", type=int, default=None,
        help=f"fine-tune the pretraining's checkpoint at this step (a multiple of {SAVE_STEPS}) instead of its final "
        "weights, as scripts/pretraining_length.py judges the checkpoints of one schedule (without it, the pretraining "
        "runs to the end)",
    )  # fmt: skip
    parser.add_argument("--label_percents", type=int, nargs="+", default=[1, 10], choices=sorted(miniature.FINETUNE_STEPS))
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[3],
        help="label subsets and fine-tuning seeds per schedule: one count, or one per --label_percents",
    )  # fmt: skip
    parser.add_argument(
        "--finetune_steps", type=int, default=None,
        help=f"steps of every fine-tune (default: the demo's per labelled fraction, {miniature.FINETUNE_STEPS})",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--table", metavar="RESULTS", default=None, help="print the table of a results.json and stop")
    args = parser.parse_args(argv)
    if len(args.seeds) not in (1, len(args.label_percents)):
        parser.error(f"--seeds {args.seeds}: give one count, or one per --label_percents {args.label_percents}.")
    args.seeds = args.seeds * len(args.label_percents) if len(args.seeds) == 1 else args.seeds
    if args.encoder_step is not None and (args.encoder_step % SAVE_STEPS or not 0 < args.encoder_step < args.pretrain_steps):
        parser.error(f"--encoder_step {args.encoder_step}: a checkpoint step, a multiple of {SAVE_STEPS} below --pretrain_steps.")
    return args


def paired_gain(results: dict, percent: str) -> list[float]:
    """The ramp's accuracy minus the constant decay's, seed by seed (the same labelled images)."""
    scores = results["scores"]
    return [ramp - constant for ramp, constant in zip(scores[RAMP][percent], scores[CONSTANT][percent])]


def table(results: dict) -> str:
    """Top-1 (mean ± std over the seeds) of each schedule, and the ramp's paired gain over the constant decay."""
    percents = list(next(iter(results["scores"].values())))
    lines = [
        "| layer-wise lr decay | " + " | ".join(f"fine-tuned, {percent} % labels" for percent in percents) + " | seeds |",
        "|---|" + "---|" * (len(percents) + 1),
    ]
    for name, by_percent in results["scores"].items():
        seeds = "/".join(str(len(by_percent[p])) for p in percents)
        lines.append(f"| {name} | " + " | ".join(f"{mean_std(by_percent[p])} %" for p in percents) + f" | {seeds} |")
    gains = [paired_gain(results, percent) for percent in percents]
    lines.append("| ramp minus constant, paired by seed | " + " | ".join(f"{mean_std(g)} points" for g in gains) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.table:
        return print_saved_table(args.table, table)
    import torch

    import init_nepa_cls_from_pretrain
    import train_finetune
    import train_pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    out = (REPO / args.output_dir).resolve()
    dataset = str((REPO / args.dataset).resolve())
    if not (Path(dataset) / "dataset_dict.json").exists():
        raise SystemExit(f"{dataset} does not exist: build it with `python download_dataset.py --dataset fashion-mnist`.")
    stages = TimedStages()
    pretrain = out / "pretrain"
    judged = out / (f"step{args.encoder_step}" if args.encoder_step else "final")  # the fine-tunes of one encoder
    classifier = judged / "classifier"
    argv_pretrain = miniature.pretrain_argv(pretrain, args.pretrain_steps, 0, dataset, save_steps=SAVE_STEPS)
    encoder = checkpoint(pretrain, args.encoder_step) if args.encoder_step else pretrain
    if encoder is None or not (encoder / "model.safetensors").exists():
        stages.run("NEPA pretraining", pretrain / "model.safetensors", train_pretrain.main, [*argv_pretrain, *demo.COMMON])
        encoder = checkpoint(pretrain, args.encoder_step) if args.encoder_step else pretrain
    stages.run("conversion", classifier / "model.safetensors", init_nepa_cls_from_pretrain.main, [
        "--pretrained_model_id", str(encoder), "--config_model_id", str(REPO / miniature.FINETUNE_CONFIG),
        "--save_local", "--local_dir", str(classifier),
    ])  # fmt: skip

    scores = {name: {str(percent): [] for percent in args.label_percents} for name in SCHEDULES}
    for percent, seeds in zip(args.label_percents, args.seeds):
        for seed in range(seeds):  # seed by seed, so that an interrupted run has whole seeds to reuse
            for index, (name, flags) in enumerate(SCHEDULES.items()):
                folder = judged / f"seed{seed}" / f"finetune{percent}-schedule{index}"
                finetune = miniature.finetune_argv(classifier, folder, percent, seed, args.finetune_steps, dataset)
                stages.run(f"fine-tuning, {percent} % labels", folder / "eval_results.json",
                           train_finetune.main, [*finetune, *flags, *demo.COMMON])  # fmt: skip
                scores[name][str(percent)].append(demo.accuracy(folder))

    arguments = {key: value for key, value in vars(args).items() if key != "table"}
    for key in ("dataset", "output_dir"):  # relative to the repository, so that the saved results name no machine
        arguments[key] = os.path.relpath((REPO / arguments[key]).resolve(), REPO)
    results = {
        **provenance("scripts/layer_decay.py", argv),
        "arguments": arguments,
        "schedules": SCHEDULES,
        "scores": scores,
        "minutes": {"fine-tunes": sum(seconds(judged / f"seed{seed}") for seed in range(max(args.seeds))) / 60},  # wall, when run
    }
    if (pretrain / "train_results.json").exists():  # the Trainer's own timing of a pretraining that ran to its end
        results["minutes"]["pretraining"] = json.loads((pretrain / "train_results.json").read_text())["train_runtime"] / 60
    (judged / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table(results))
    print(f"written to {judged / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
