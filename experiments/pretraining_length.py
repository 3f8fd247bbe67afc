"""Does longer NEPA pretraining pay off in the miniature? Accuracy against pretraining length, and collapse.

    python -m experiments.pretraining_length --threads 1          # everything, one stage after another
    python -m experiments.pretraining_length --plot               # docs/figures/pretraining_length.png
    python -m experiments.pretraining_length --plot --results docs/figures/pretraining_length.json   # from the committed results

One NEPA pretraining of the demo's model and settings (experiments/miniature.py) under one cosine schedule
sized for the longest of --steps, saving a checkpoint every gcd(--steps) steps; the checkpoints at --steps
(and the untrained encoder, "random init") are each judged the demo's way: k-NN, linear and attentive
probes fitted on 10 % of the labels (miniature.probe_argv), fine-tuning on 1 % and 10 %
(miniature.finetune_argv), --seeds label subsets and fine-tuning seeds. The longest pretraining and
random init are also fine-tuned two other ways: --long_factor times longer (does more fine-tuning, rather
than more pretraining, close the gap?), and with the causal attention of pretraining kept (does the switch
to bidirectional attention at fine-tuning erase what pretraining learned?). A second pretraining without
stop-gradient (its own cosine schedule, sized for the longest of --collapse_steps) gives the collapse curve:
its logged target_cosine and the k-NN probe of its checkpoints, beside the stop-gradient run's.

--part runs one share of the work, so that it can be spread over processes on a multi-core CPU:
`pretrain` (the stop-gradient pretraining), `collapse` (the no-stop-gradient pretraining and its probes),
`evaluate` (probes and fine-tunes of the --encoders whose weights exist; run it again as checkpoints
appear). A stage whose result exists is reused. Every run collects what exists into
<output_dir>/results.json; --plot draws the figure from that file alone.
"""

import argparse
import json
import math
import os
import statistics
from pathlib import Path

from experiments import miniature
from experiments.runner import (
    CPU_FLAGS, IN_MEMORY, REPO, Stages, accuracy, add_finetune_steps_flag, add_threads_flag, ensure_dataset,
    check_finetune_budget, finetune_budget, mean_std, pretraining_checkpoint, provenance, stage_seconds, use_threads,
)  # fmt: skip

FIGURE = REPO / "docs" / "figures" / "pretraining_length.png"
RANDOM = "random-init"
PROBES = ("knn", "linear", "attentive")
FINETUNE_PERCENTS = (1, 10)  # the labelled fractions every encoder is fine-tuned on
PROTOCOLS = (*PROBES, "finetune1", "finetune10")
# The other fine-tunes of the longest pretraining and random init: the demo's, longer, and with causal attention.
VARIANTS = ("", "-long", "-causal")
VARIANT_PROTOCOLS = tuple(f"finetune{percent}{variant}" for variant in VARIANTS[1:] for percent in FINETUNE_PERCENTS)
LABELS = {
    "knn": "k-NN (10 % labels)",
    "linear": "linear probe (10 % labels)",
    "attentive": "attentive probe (10 % labels)",
    "finetune1": "fine-tuned, 1 % labels",
    "finetune10": "fine-tuned, 10 % labels",
}
VARIANT_LABELS = {"": "the demo's fine-tune", "-long": "{factor}x longer", "-causal": "causal attention kept"}
FLAGS = [*CPU_FLAGS, *IN_MEMORY]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=miniature.DATASET)
    parser.add_argument("--output_dir", default="outputs/pretraining_length")
    parser.add_argument("--steps", type=int, nargs="+", default=[250, 1000, 4000, 16000], help="pretraining lengths judged")
    parser.add_argument(
        "--collapse_steps", type=int, nargs="+", default=[250, 1000, 4000],
        help="checkpoints of the no-stop-gradient pretraining whose k-NN probe is measured",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3, help="label subsets and fine-tuning seeds per encoder")
    add_finetune_steps_flag(parser)
    parser.add_argument("--long_factor", type=int, default=4, help="the long fine-tune's steps, in demo fine-tunes")
    parser.add_argument("--long_seeds", type=int, default=2, help="seeds of the long fine-tune")
    parser.add_argument("--causal_seeds", type=int, default=3, help="seeds of the fine-tune with causal attention kept")
    parser.add_argument("--part", choices=("all", "pretrain", "collapse", "evaluate"), default="all")
    parser.add_argument(
        "--encoders", nargs="+", default=None,
        help=f"with --part evaluate: only these encoders ({RANDOM} and / or pretraining steps)",
    )  # fmt: skip
    add_threads_flag(parser)
    parser.add_argument("--plot", action="store_true", help="draw --figure from <output_dir>/results.json and stop")
    parser.add_argument("--figure", default=str(FIGURE.relative_to(REPO)))
    parser.add_argument(
        "--results", default=None,
        help="the results --plot draws (default: <output_dir>/results.json; the measured ones: docs/figures/pretraining_length.json)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.encoders and args.part != "evaluate":
        parser.error("--encoders chooses what --part evaluate judges; pass --part evaluate.")
    known = {RANDOM, *map(str, args.steps)}
    if args.encoders and not set(args.encoders) <= known:
        parser.error(f"--encoders {sorted(set(args.encoders) - known)}: not {RANDOM} or one of --steps {args.steps}.")
    check_finetune_budget(parser, args.finetune_steps, FINETUNE_PERCENTS)
    return args


def save_every(steps: list[int]) -> int:
    return math.gcd(*steps)


def pretrain_argv(args, output: Path, steps: list[int], stop_grad: bool) -> list[str]:
    overrides = "" if stop_grad else "nepa_stop_grad=false"
    every = save_every(steps)
    argv = miniature.pretrain_argv(
        output, max(steps), 0, args.dataset, config_overrides=overrides, logging_steps=min(50, every), save_steps=every
    )
    return [*argv, *FLAGS]


def probe(args, stages, encoder: Path, protocol: str, folder: Path, seed: int) -> None:
    import eval as eval_script

    argv = miniature.probe_argv(encoder, folder, protocol, seed, args.dataset)
    stages.run(f"{protocol} probe", folder / "eval_results.json", eval_script.main, [*argv, *FLAGS])


def evaluate(args, stages, encoders: dict[str, Path]) -> None:
    """The demo's judgement of each encoder, seed by seed across the encoders (so that an interrupted run has
    whole seeds), then the causal and the long fine-tunes of random init and the longest pretraining."""
    import init_nepa_cls_from_pretrain
    import train_finetune

    out = Path(args.output_dir)
    for name, encoder in encoders.items():
        argv = miniature.convert_argv(encoder, out / "classifiers" / name)
        stages.run("conversion", out / "classifiers" / name / "model.safetensors", init_nepa_cls_from_pretrain.main, argv)
    extremes = [name for name in encoders if name in (RANDOM, f"steps{max(args.steps)}")]
    runs = [(seed, name, "") for seed in range(args.seeds) for name in encoders]
    for variant, seeds in (("-causal", args.causal_seeds), ("-long", args.long_seeds)):
        runs += [(seed, name, variant) for seed in range(seeds) for name in extremes]
    budget = finetune_budget(args.finetune_steps, FINETUNE_PERCENTS)
    for seed, name, variant in runs:
        folder = out / name / f"seed{seed}"
        if not variant:
            for protocol in PROBES:
                probe(args, stages, encoders[name], protocol, folder / protocol, seed)
        for percent in FINETUNE_PERCENTS:
            steps = budget[percent] * (args.long_factor if variant == "-long" else 1)
            label = f"finetune{percent}{variant}"
            argv = miniature.finetune_argv(out / "classifiers" / name, folder / label, percent, seed, steps, args.dataset)
            causal = ["--is_causal", "True"] if variant == "-causal" else []
            stages.run(f"fine-tuning, {percent} % labels{variant}", folder / label / "eval_results.json",
                       train_finetune.main, [*argv, *causal, *FLAGS])  # fmt: skip


def log_curve(pretrain: Path, key: str) -> list[list[float]]:
    """[step, value] of a logged metric, from the newest trainer state (final, else the newest checkpoint)."""
    from nepa.checkpoint import checkpoint_folders

    states = [pretrain / "trainer_state.json"] + [folder / "trainer_state.json" for folder in checkpoint_folders(pretrain)]
    for state in states:
        if state.exists():
            history = json.loads(state.read_text())["log_history"]
            return [[entry["step"], entry[key]] for entry in history if key in entry]
    return []


def layerscale(pretrain: Path) -> dict[int, float]:
    """Mean |LayerScale lambda| of each checkpoint: how far the blocks have grown from the identity (init 1e-5)."""
    from safetensors.torch import load_file

    from nepa.checkpoint import checkpoint_folders, checkpoint_step

    means = {}
    for folder in checkpoint_folders(pretrain):
        if (folder / "trainer_state.json").exists():
            scales = [v.abs().mean().item() for k, v in load_file(folder / "model.safetensors").items() if "lambda" in k]
            means[checkpoint_step(folder)] = statistics.mean(scales) if scales else None
    return dict(sorted(means.items()))


def collect(args, measured_by: dict) -> dict:
    out = Path(args.output_dir)
    encoders = {RANDOM: 0, **{f"steps{step}": step for step in args.steps}}
    scores = {}
    for name, step in encoders.items():
        found = {}
        for protocol in PROTOCOLS + VARIANT_PROTOCOLS:
            files = sorted((out / name).glob(f"seed*/{protocol}/eval_results.json"))
            if files:
                found[protocol] = [accuracy(file.parent) for file in files]
        scores[name] = {"pretraining_steps": step, "scores": found}
    collapse = {}
    for run in ("stopgrad", "nostopgrad"):
        knn = {}
        for step in sorted(set(args.collapse_steps) | (set(args.steps) if run == "stopgrad" else set())):
            # the stop-gradient run's judged checkpoints have their k-NN already: seed 0's probe
            judged = run == "stopgrad" and step in args.steps
            folder = out / f"steps{step}" / "seed0" / "knn" if judged else out / run / f"knn-steps{step}"
            if (folder / "eval_results.json").exists():
                knn[step] = accuracy(folder)
        collapse[run] = {
            "target_cosine": log_curve(out / run / "pretrain", "target_cosine"),
            "loss": log_curve(out / run / "pretrain", "loss"),
            "knn": knn,
            "layerscale": layerscale(out / run / "pretrain"),
        }
    minutes = {
        "pretraining (stop-gradient)": stage_seconds(out / "stopgrad" / "pretrain") / 60,
        "pretraining (no stop-gradient)": stage_seconds(out / "nostopgrad" / "pretrain") / 60,
        "collapse probes": sum(stage_seconds(folder) for folder in (out / "nostopgrad").glob("knn-*")) / 60,
        "conversions": stage_seconds(out / "classifiers") / 60 if (out / "classifiers").exists() else 0.0,
        **{f"probes and fine-tunes of {name}": stage_seconds(out / name) / 60 for name in encoders if (out / name).exists()},
    }
    arguments = {key: value for key, value in vars(args).items() if key not in ("part", "encoders", "plot", "figure", "results")}
    for key in ("dataset", "output_dir"):  # relative to the repository, so that the saved results name no machine
        arguments[key] = os.path.relpath(arguments[key], REPO)
    results = {
        **measured_by,
        "arguments": arguments,
        "encoders": scores,
        "collapse": collapse,
        "minutes": minutes,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def table(results: dict) -> str:
    """Two markdown tables, mean ± std over the seeds (their count in the last column): every protocol along the
    pretraining length, then the three fine-tunes of the longest pretraining and random init."""
    encoders = results["encoders"]
    protocols = [p for p in PROTOCOLS if any(p in e["scores"] for e in encoders.values())]
    lines = [
        "| encoder | " + " | ".join(LABELS[p] for p in protocols) + " | seeds |",
        "|---|" + "---|" * (len(protocols) + 1),
    ]
    for name, entry in encoders.items():
        row = "random init" if name == RANDOM else f"NEPA, {entry['pretraining_steps']:,} steps"
        cells = [f"{mean_std(entry['scores'][p])} %" if p in entry["scores"] else "-" for p in protocols]
        seeds = "/".join(sorted({str(len(entry["scores"][p])) for p in protocols if p in entry["scores"]})) or "-"
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {seeds} |")
    longest = max(encoders.values(), key=lambda e: e["pretraining_steps"])
    pair = [(f"NEPA, {longest['pretraining_steps']:,} steps", longest["scores"]), ("random init", encoders[RANDOM]["scores"])]
    lines += [
        "",
        "| fine-tune | " + " | ".join(f"{percent} % labels, {who}" for percent in FINETUNE_PERCENTS for who, _ in pair) + " | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        label = VARIANT_LABELS[variant].format(factor=results["arguments"]["long_factor"])
        keys = [(f"finetune{percent}{variant}", scores) for percent in FINETUNE_PERCENTS for _, scores in pair]
        cells = [f"{mean_std(scores[key])} %" if key in scores else "-" for key, scores in keys]
        seeds = "/".join(sorted({str(len(scores[key])) for key, scores in keys if key in scores})) or "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(lines)


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation in percentage points (0 for a single value)."""
    values = [100 * value for value in values]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot_accuracy(axis, encoders: dict, pretrained: list[dict]) -> None:
    """Each protocol's top-1 against the pretraining length, random init's as a dashed line."""
    random = encoders[RANDOM]["scores"]
    colours = dict(zip(PROTOCOLS, ("tab:blue", "tab:orange", "tab:purple", "tab:green", "tab:red")))
    for protocol, colour in colours.items():
        points = [(e["pretraining_steps"], spread(e["scores"][protocol])) for e in pretrained if protocol in e["scores"]]
        if points:
            steps = [step for step, _ in points]
            mean, std = zip(*(value for _, value in points))
            axis.plot(steps, mean, "o-", color=colour, label=LABELS[protocol])
            axis.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=colour, alpha=0.2)
        if protocol in random:
            mean, std = spread(random[protocol])
            axis.axhline(mean, color=colour, linestyle="--", linewidth=1)
            axis.axhspan(mean - std, mean + std, color=colour, alpha=0.08)
    axis.set_xlabel("NEPA pretraining steps (batch 128)")
    axis.set_ylabel("top-1 on the 10,000 test images (%)")
    axis.set_title("Accuracy against pretraining length\n(band: ± std over seeds; dashed: random init)")
    axis.legend(fontsize=8, loc="lower right")


def plot_variants(axis, encoders: dict, longest: dict | None, factor: int) -> None:
    """The longest pretraining's fine-tunes beside random init's, one group per fine-tune."""
    for group, variant in enumerate(VARIANTS):
        for percent, colour in ((1, "tab:green"), (10, "tab:red")):
            key = f"finetune{percent}{variant}"
            for offset, entry, marker in ((-0.12, longest, "o"), (0.12, encoders[RANDOM], "x")):
                if entry and key in entry["scores"]:
                    mean, std = spread(entry["scores"][key])
                    axis.errorbar(group + offset, mean, yerr=std, fmt=marker, color=colour, markersize=9, capsize=4)
    axis.set_xticks(range(len(VARIANTS)), [VARIANT_LABELS[v].format(factor=factor) for v in VARIANTS])
    axis.set_xlim(-0.5, len(VARIANTS) - 0.5)
    steps = f"{longest['pretraining_steps']:,}" if longest else "-"
    axis.set_title(f"Fine-tunes of the {steps}-step encoder (o) and random init (x)\n(green: 1 % labels; red: 10 %; bar: ± std)")
    axis.set_ylabel("top-1 (%)")


def plot_collapse(cos, knn, results: dict) -> None:
    """Both pretrainings' target_cosine along the steps, and the k-NN probe of their checkpoints."""
    arguments, random = results["arguments"], results["encoders"][RANDOM]["scores"]
    schedules = {"stopgrad": max(arguments["steps"]), "nostopgrad": max(arguments["collapse_steps"])}
    for run, colour, name in (("stopgrad", "tab:blue", "stop-gradient (NEPA)"), ("nostopgrad", "tab:red", "no stop-gradient")):
        label = f"{name}, a {schedules[run]:,}-step schedule"
        curve = results["collapse"][run]
        if curve["target_cosine"]:
            cos.plot(*zip(*curve["target_cosine"]), color=colour, label=label)
        if curve["knn"]:
            knn.plot([int(step) for step in curve["knn"]], [100 * v for v in curve["knn"].values()], "o-", color=colour, label=label)
    if "knn" in random:
        knn.axhline(spread(random["knn"])[0], color="gray", linestyle="--", label="random init")
    cos.set_title("Collapse: mean pairwise cosine of the targets")
    cos.set_xlabel("pretraining step")
    cos.set_ylabel("target_cosine (training batches)")
    cos.set_xscale("log")
    cos.set_ylim(0, 1)
    knn.set_title("k-NN of the checkpoints (10 % labels, seed 0)")
    knn.set_xlabel("pretraining step")
    knn.set_ylabel("top-1 (%)")


def plot(results: dict, figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((acc, variants), (cos, knn)) = plt.subplots(2, 2, figsize=(14, 11))
    encoders = results["encoders"]
    pretrained = sorted((e for e in encoders.values() if e["pretraining_steps"]), key=lambda e: e["pretraining_steps"])
    plot_accuracy(acc, encoders, pretrained)
    plot_variants(variants, encoders, pretrained[-1] if pretrained else None, results["arguments"]["long_factor"])
    plot_collapse(cos, knn, results)
    probed = sorted({int(step) for run in results["collapse"].values() for step in run["knn"]})
    for axis, ticks in ((acc, [e["pretraining_steps"] for e in pretrained]), (knn, probed)):
        axis.set_xscale("log")
        axis.set_xticks(ticks, [f"{step:,}" for step in ticks])
        axis.minorticks_off()
    for axis in (cos, knn):
        axis.legend(fontsize=8)
    for axis in (acc, variants, cos, knn):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    print(f"written to {figure}")


def pretrain(args, stages: Stages) -> None:
    """The pretraining(s) of --part: with stop-gradient (the curve), without (the collapse)."""
    import train_pretrain

    runs = {"stopgrad": (args.steps, True), "nostopgrad": (args.collapse_steps, False)}
    for run, (steps, stop_grad) in runs.items():
        if args.part in ("all", "pretrain" if stop_grad else "collapse"):
            folder = Path(args.output_dir) / run / "pretrain"
            stages.run(f"{run} pretraining", folder / "model.safetensors", train_pretrain.main,
                       pretrain_argv(args, folder, steps, stop_grad))  # fmt: skip


def encoders_to_judge(args) -> dict[str, Path]:
    """Random init (saved the first time) and the stop-gradient checkpoints at --steps (or --encoders) that exist."""
    out = Path(args.output_dir)
    if not (out / RANDOM / "encoder" / "model.safetensors").exists():
        miniature.save_untrained_encoder(out / RANDOM / "encoder")
    encoders = {}
    for name in args.encoders or [RANDOM, *map(str, args.steps)]:
        encoder = out / RANDOM / "encoder" if name == RANDOM else pretraining_checkpoint(out / "stopgrad" / "pretrain", int(name))
        if encoder is None:
            print(f"==> steps {name}: no checkpoint yet, skipped", flush=True)
        else:
            encoders[name if name == RANDOM else f"steps{name}"] = encoder
    return encoders


def probe_collapse(args, stages: Stages) -> None:
    """The k-NN probe of the checkpoints at --collapse_steps of both pretrainings (the stop-gradient run's judged
    checkpoints have theirs already)."""
    out = Path(args.output_dir)
    for run, steps in (("nostopgrad", args.collapse_steps), ("stopgrad", [s for s in args.collapse_steps if s not in args.steps])):
        for step in steps:
            encoder = pretraining_checkpoint(out / run / "pretrain", step)
            if encoder is not None:
                probe(args, stages, encoder, "knn", out / run / f"knn-steps{step}", 0)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.output_dir = str((REPO / args.output_dir).resolve())
    if args.plot:
        results = json.loads(Path(args.results or Path(args.output_dir) / "results.json").read_text())
        plot(results, (REPO / args.figure).resolve())
        return results
    measured_by = provenance("experiments.pretraining_length", argv)  # the code as the run starts
    use_threads(args.threads)
    stages = Stages(keep_times=True)
    args.dataset = ensure_dataset(args.dataset, stages)
    pretrain(args, stages)
    if args.part in ("all", "evaluate"):
        evaluate(args, stages, encoders_to_judge(args))
    if args.part in ("all", "collapse"):
        probe_collapse(args, stages)
    results = collect(args, measured_by)
    print("\n" + table(results))
    return results


if __name__ == "__main__":
    main()
