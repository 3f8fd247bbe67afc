"""Does the paper's layer-decay ramp help in miniature? Constant decay, the ramp, and no decay, fine-tuned alike.

    python -m experiments.layer_decay --threads 1                          # pretrain, convert, 18 fine-tunes, the table
    python -m experiments.layer_decay --table docs/figures/layer_decay.json   # the table of the committed results

One NEPA pretraining of the demo's model under the miniature's settings (experiments/miniature.py, --pretrain_steps
under one cosine schedule), converted to a classifier (its final weights, or with --encoder_step a checkpoint of
that schedule), then fine-tuned the demo's way (miniature.finetune_argv: 1 % and 10 % of the labels,
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
from pathlib import Path

from experiments import miniature
from experiments.runner import (
    CPU_FLAGS, IN_MEMORY, REPO, Stages, accuracy, add_finetune_steps_flag, add_threads_flag, check_finetune_budget, ensure_dataset,
    finetune_budget,
    mean_std, pretraining_checkpoint, print_saved_table, provenance, stage_seconds, use_threads,
)  # fmt: skip

# train_finetune.py's flags for each schedule, after the miniature's (whose --llrd is 1.0).
SCHEDULES = {
    "constant 0.65 (release scripts)": ["--llrd", "0.65"],
    "ramp 0.35 -> 1.0 (paper)": ["--llrd", "0.35", "--llrd_end", "1.0"],
    "none (1.0, the miniature's)": ["--llrd", "1.0"],
}
CONSTANT, RAMP = list(SCHEDULES)[:2]
FLAGS = [*CPU_FLAGS, *IN_MEMORY]
SAVE_STEPS = 1000  # pretraining checkpoints, so that an interrupted pretraining resumes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=miniature.DATASET)
    parser.add_argument("--output_dir", default="outputs/layer_decay")
    parser.add_argument("--pretrain_steps", type=int, default=4000, help="the length of the pretraining's cosine schedule")
    parser.add_argument(
        "--encoder_step", type=int, default=None,
        help=f"fine-tune the pretraining's checkpoint at this step (a multiple of {SAVE_STEPS}) instead of its final "
        "weights, as experiments/pretraining_length.py judges the checkpoints of one schedule (without it, the pretraining "
        "runs to the end)",
    )  # fmt: skip
    parser.add_argument("--label_percents", type=int, nargs="+", default=[1, 10], choices=sorted(miniature.FINETUNE_STEPS))
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[3],
        help="label subsets and fine-tuning seeds per schedule: one count, or one per --label_percents",
    )  # fmt: skip
    add_finetune_steps_flag(parser)
    add_threads_flag(parser)
    parser.add_argument("--table", metavar="RESULTS", default=None, help="print the table of a results.json and stop")
    args = parser.parse_args(argv)
    if len(args.seeds) not in (1, len(args.label_percents)):
        parser.error(f"--seeds {args.seeds}: give one count, or one per --label_percents {args.label_percents}.")
    args.seeds = args.seeds * len(args.label_percents) if len(args.seeds) == 1 else args.seeds
    check_finetune_budget(parser, args.finetune_steps, args.label_percents)
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


def classifier_of_the_encoder(args, stages: Stages, out: Path, judged: Path, dataset: str) -> Path:
    """The pretraining (run to its end unless the checkpoint judged exists), its encoder converted to a classifier."""
    import init_nepa_cls_from_pretrain
    import train_pretrain

    pretrain = out / "pretrain"
    argv = miniature.pretrain_argv(pretrain, args.pretrain_steps, 0, dataset, save_steps=SAVE_STEPS)
    encoder = pretraining_checkpoint(pretrain, args.encoder_step) if args.encoder_step else pretrain
    if encoder is None or not (encoder / "model.safetensors").exists():
        stages.run("NEPA pretraining", pretrain / "model.safetensors", train_pretrain.main, [*argv, *FLAGS])
        encoder = pretraining_checkpoint(pretrain, args.encoder_step) if args.encoder_step else pretrain
    classifier = judged / "classifier"
    argv = miniature.convert_argv(encoder, classifier)
    stages.run("conversion", classifier / "model.safetensors", init_nepa_cls_from_pretrain.main, argv)
    return classifier


def fine_tune_each_schedule(args, stages: Stages, judged: Path, classifier: Path, dataset: str) -> dict:
    """Top-1 of each schedule's fine-tunes, per labelled percentage, seed by seed (so that an interrupted run has
    whole seeds to reuse)."""
    import train_finetune

    scores = {name: {str(percent): [] for percent in args.label_percents} for name in SCHEDULES}
    budget = finetune_budget(args.finetune_steps, args.label_percents)
    for percent, seeds in zip(args.label_percents, args.seeds):
        for seed in range(seeds):
            for index, (name, flags) in enumerate(SCHEDULES.items()):
                folder = judged / f"seed{seed}" / f"finetune{percent}-schedule{index}"
                finetune = miniature.finetune_argv(classifier, folder, percent, seed, budget[percent], dataset)
                stages.run(f"fine-tuning, {percent} % labels", folder / "eval_results.json",
                           train_finetune.main, [*finetune, *flags, *FLAGS])  # fmt: skip
                scores[name][str(percent)].append(accuracy(folder))
    return scores


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.table:
        return print_saved_table(args.table, table)
    use_threads(args.threads)
    out = (REPO / args.output_dir).resolve()
    stages = Stages(keep_times=True)
    dataset = ensure_dataset(args.dataset, stages)
    judged = out / (f"step{args.encoder_step}" if args.encoder_step else "final")  # the fine-tunes of one encoder
    classifier = classifier_of_the_encoder(args, stages, out, judged, dataset)
    scores = fine_tune_each_schedule(args, stages, judged, classifier, dataset)

    arguments = {key: value for key, value in vars(args).items() if key != "table"}
    for key in ("dataset", "output_dir"):  # relative to the repository, so that the saved results name no machine
        arguments[key] = os.path.relpath((REPO / arguments[key]).resolve(), REPO)
    fine_tunes = sum(stage_seconds(judged / f"seed{seed}") for seed in range(max(args.seeds)))
    results = {
        **provenance("experiments.layer_decay", argv),
        "arguments": arguments,
        "schedules": SCHEDULES,
        "scores": scores,
        "minutes": {"fine-tunes": fine_tunes / 60},  # wall, when run
    }
    if (out / "pretrain" / "train_results.json").exists():  # the Trainer's own timing of a pretraining run to its end
        results["minutes"]["pretraining"] = json.loads((out / "pretrain" / "train_results.json").read_text())["train_runtime"] / 60
    (judged / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table(results))
    print(f"written to {judged / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
