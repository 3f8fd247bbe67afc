"""NEPA's label efficiency in miniature: Fashion-MNIST, a tiny ViT, the CPU (run through scripts/demo.sh).

    python -m experiments.demo --seeds 3 --threads 1        # -> outputs/demo/results.md and results.json
    python -m experiments.demo --table docs/figures/demo.json   # the README's table, from its committed results

Pretrain one small causal ViT with NEPA, then compare it with the same ViT at random initialisation
under the semi-supervised protocol: k-NN and linear probes of the frozen encoders fitted on 10 % of the
labels, and fine-tuning on 1 % and 10 % of the labels (a seeded, class-balanced subset, the same images
for both encoders), every score on the 10,000 test images. `--seeds N` repeats the probes and
fine-tunes with N label subsets and prints mean ± std. The settings are those of experiments/miniature.py
(chosen by the sweeps in docs/miniature.md; the fine-tunes take the demo's own step budget, DEMO_FINETUNE_STEPS); every stage reads its images through the in-memory fast path
(`--images_in_memory`, docs/usage.md).

Every stage calls an entry point's `main(argv)` in this one process, so imports are paid for once. The
table goes to outputs/demo/results.md, the per-seed figures, stage times, commit and command to
results.json (`--table results.json` prints the table again from such a file: the README's comes from
docs/figures/demo.json); a second run reuses every stage whose results exist (--rerun starts over).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from experiments import miniature
from experiments.runner import (
    CPU_FLAGS, IN_MEMORY, REPO, Stages, accuracy, add_finetune_steps_flag, add_threads_flag, check_finetune_budget, ensure_dataset,
    finetune_budget,
    mean_std, print_saved_table, provenance, use_threads,
)  # fmt: skip

FLAGS = [*CPU_FLAGS, *IN_MEMORY]
ENCODERS = {"NEPA-pretrained": "pretrain", "random init": "random-init"}  # each row's encoder folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=miniature.DATASET)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--pretrain_steps", type=int, default=miniature.PRETRAIN_STEPS)
    parser.add_argument("--seeds", type=int, default=1, help="label subsets (and fine-tuning seeds) to average over")
    parser.add_argument(
        "--label_percents", type=float, nargs="+", default=[1, 10],
        help="fine-tune on these percentages of each class's labels (100: all of them)",
    )  # fmt: skip
    add_finetune_steps_flag(parser, miniature.DEMO_FINETUNE_STEPS)
    add_threads_flag(parser)
    parser.add_argument("--rerun", action="store_true", help="run every stage again")
    parser.add_argument("--table", metavar="RESULTS_JSON", help="print the table of a results.json this script wrote, and stop")
    args = parser.parse_args(argv)
    check_finetune_budget(parser, args.finetune_steps, args.label_percents, miniature.DEMO_FINETUNE_STEPS)
    return args


def table(results: dict) -> str:
    """The demo's table in Markdown, from what `main` returns (or wrote to results.json)."""
    arguments, scores = results["arguments"], results["scores"]
    seeds = arguments["seeds"]
    columns = list(next(iter(scores.values())))
    lines = [
        f"# NEPA demo: Fashion-MNIST, {Path(miniature.PRETRAIN_CONFIG).name} on the CPU",
        "",
        f"NEPA pretraining {arguments['pretrain_steps']:,} steps of {results['pretrain_batch_size']} images; "
        f"probes fitted on {miniature.PROBE_LABELS_PERCENT} % of the labels; top-1 on all test images; "
        + ("one seed." if seeds == 1 else f"mean ± std over {seeds} seeds (label subsets and fine-tuning)."),
        f"Commit {results['commit']}: `{results['command']}`",
        "",
        "| encoder | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    lines += [f"| {row} | " + " | ".join(f"{mean_std(values[column])} %" for column in columns) + " |" for row, values in scores.items()]
    lines += ["", "| stage | minutes |", "|---|---|"]
    lines += [f"| {kind} | {seconds / 60:.1f} |" for kind, seconds in results["seconds"].items() if kind != "total"]
    lines += [f"| total (this run) | {results['seconds']['total'] / 60:.1f} |", ""]
    return "\n".join(lines)


def make_encoders(args, stages: Stages, out: Path, dataset: str) -> dict[str, Path]:
    """The two encoders, NEPA-pretrained and untrained, converted to classifiers; the classifier of each row."""
    import init_nepa_cls_from_pretrain
    import train_pretrain

    encoders = {row: out / folder for row, folder in ENCODERS.items()}
    argv = miniature.pretrain_argv(encoders["NEPA-pretrained"], args.pretrain_steps, dataset=dataset)
    stages.run("NEPA pretraining", encoders["NEPA-pretrained"] / "model.safetensors", train_pretrain.main, [*argv, *FLAGS])
    if not (encoders["random init"] / "model.safetensors").exists() or args.rerun:
        miniature.save_untrained_encoder(encoders["random init"])
    classifiers = {row: out / f"cls-{encoder.name}" for row, encoder in encoders.items()}
    for row, encoder in encoders.items():
        argv = miniature.convert_argv(encoder, classifiers[row])
        stages.run("conversion", classifiers[row] / "model.safetensors", init_nepa_cls_from_pretrain.main, argv)
    return classifiers


def judge(args, stages: Stages, out: Path, dataset: str, classifiers: dict[str, Path]) -> dict[str, dict[str, list[float]]]:
    """Each row's probes and fine-tunes, seed by seed (so that an interrupted run has whole seeds to reuse)."""
    import eval as eval_script
    import train_finetune

    encoders = {row: out / folder for row, folder in ENCODERS.items()}
    columns = ["k-NN", "linear probe (best head)"] + [f"fine-tuned, {percent:g} % labels" for percent in args.label_percents]
    scores: dict[str, dict[str, list[float]]] = {row: {column: [] for column in columns} for row in encoders}
    budget = finetune_budget(args.finetune_steps, args.label_percents, miniature.DEMO_FINETUNE_STEPS)
    for seed in range(args.seeds):
        for row, encoder in encoders.items():
            for protocol, column in (("knn", "k-NN"), ("linear", "linear probe (best head)")):
                folder = out / f"seed{seed}" / f"{protocol}-{encoder.name}"
                argv = miniature.probe_argv(encoder, folder, protocol, seed, dataset)
                stages.run(f"{protocol} probe", folder / "eval_results.json", eval_script.main, [*argv, *FLAGS])
                scores[row][column].append(accuracy(folder))
            for percent, column in zip(args.label_percents, columns[2:]):
                folder = out / f"seed{seed}" / f"finetune{percent:g}-{encoder.name}"
                argv = miniature.finetune_argv(classifiers[row], folder, percent, seed, budget[percent], dataset)
                stages.run(f"fine-tuning, {percent:g} % labels", folder / "eval_results.json", train_finetune.main, [*argv, *FLAGS])
                scores[row][column].append(accuracy(folder))
    return scores


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.table:
        return print_saved_table(args.table, table)
    start, measured_by = time.time(), provenance("experiments.demo", argv)  # the code as the run starts
    use_threads(args.threads)
    out = (REPO / args.output_dir).resolve()
    if args.rerun and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.rerun)
    stages.seconds["start-up"] = time.time() - start
    dataset = ensure_dataset(args.dataset, stages)
    classifiers = make_encoders(args, stages, out, dataset)
    scores = judge(args, stages, out, dataset, classifiers)
    results = {
        **measured_by,
        "arguments": vars(args),
        "pretrain_batch_size": miniature.PRETRAIN["per_device_train_batch_size"],
        "scores": scores,
        "seconds": {**stages.seconds, "total": time.time() - start},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (out / "results.md").write_text(text)
    print("\n" + text)
    print(f"written to {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
