"""NEPA's label efficiency in miniature: Fashion-MNIST, a tiny ViT, the CPU (run through scripts/demo.sh).

Pretrain one small causal ViT with NEPA, then compare it with the same ViT at random initialisation
under the semi-supervised protocol: k-NN and linear probes of the frozen encoders fitted on 10 % of the
labels, and fine-tuning on 1 % and 10 % of the labels (a seeded, class-balanced subset, the same images
for both encoders), every score on the 10,000 test images. `--seeds N` repeats the probes and
fine-tunes with N label subsets and prints mean ± std. The settings are those of scripts/miniature.py
(chosen by the sweep in docs/miniature.md); every stage reads its images through the in-memory fast path
(`--images_in_memory`, docs/usage.md).

Every stage calls an entry point's `main(argv)` in this one process, so imports are paid for once. The
table goes to outputs/demo/results.md, the per-seed figures, stage times, commit and command to
results.json (`--table results.json` prints the table again from such a file: the README's comes from
docs/figures/demo.json); a second run reuses every stage whose results exist (--rerun starts over).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts import miniature  # noqa: E402
from scripts.experiment import Stages, mean_std, print_saved_table, provenance  # noqa: E402

# The in-memory path needs no worker process: the crops of a batch take one call in the training process.
COMMON = ["--use_cpu", "True", "--report_to", "none", "--images_in_memory", "True", "--dataloader_num_workers", "0"]


def accuracy(folder: Path) -> float:
    return json.loads((folder / "eval_results.json").read_text())["eval_accuracy"]


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
    parser.add_argument(
        "--finetune_steps", type=int, nargs="+", default=None,
        help=f"steps of the fine-tunes, one per --label_percents (default: {miniature.FINETUNE_STEPS})",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: torch's choice, all cores); on a CPU shared with other work, 1 can be faster",
    )  # fmt: skip
    parser.add_argument("--rerun", action="store_true", help="run every stage again")
    parser.add_argument("--table", metavar="RESULTS_JSON", help="print the table of a results.json this script wrote, and stop")
    args = parser.parse_args(argv)
    if args.finetune_steps is None:
        unknown = [p for p in args.label_percents if p not in miniature.FINETUNE_STEPS]
        if unknown:
            parser.error(f"no step budget for {unknown} % of the labels: pass --finetune_steps, or use {list(miniature.FINETUNE_STEPS)}.")
        args.finetune_steps = [miniature.FINETUNE_STEPS[p] for p in args.label_percents]
    elif len(args.finetune_steps) != len(args.label_percents):
        parser.error(f"--finetune_steps takes one value per --label_percents ({len(args.label_percents)}), got {len(args.finetune_steps)}.")
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.table:
        return print_saved_table(args.table, table)
    start, measured_by = time.time(), provenance("scripts/demo.py", argv)  # the code as the run starts
    import torch

    import download_dataset
    import eval as eval_script
    import init_nepa_cls_from_pretrain
    import train_finetune
    import train_pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    out = (REPO / args.output_dir).resolve()
    if args.rerun and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = str((REPO / args.dataset).resolve())
    stages = Stages(args.rerun)
    stages.seconds["start-up"] = time.time() - start
    if not (Path(dataset) / "dataset_dict.json").exists():
        stages.run("dataset", Path(dataset) / "dataset_dict.json", download_dataset.main,
                   ["--dataset", "fashion-mnist", "--output_dir", dataset])  # fmt: skip

    encoders = {"NEPA-pretrained": out / "pretrain", "random init": out / "random-init"}
    argv = miniature.pretrain_argv(encoders["NEPA-pretrained"], args.pretrain_steps, dataset=dataset)
    stages.run("NEPA pretraining", encoders["NEPA-pretrained"] / "model.safetensors", train_pretrain.main, [*argv, *COMMON])
    if not (encoders["random init"] / "model.safetensors").exists() or args.rerun:
        miniature.save_untrained_encoder(encoders["random init"])

    classifiers = {row: out / f"cls-{encoder.name}" for row, encoder in encoders.items()}
    for row, encoder in encoders.items():
        stages.run("conversion", classifiers[row] / "model.safetensors", init_nepa_cls_from_pretrain.main, [
            "--pretrained_model_id", str(encoder), "--config_model_id", str(REPO / miniature.FINETUNE_CONFIG),
            "--save_local", "--local_dir", str(classifiers[row]),
        ])  # fmt: skip

    columns = ["k-NN", "linear probe (best head)"] + [f"fine-tuned, {percent:g} % labels" for percent in args.label_percents]
    scores: dict[str, dict[str, list[float]]] = {row: {column: [] for column in columns} for row in encoders}
    for seed in range(args.seeds):  # seed by seed, so that an interrupted run has whole seeds to reuse
        for row, encoder in encoders.items():
            for protocol, column in (("knn", "k-NN"), ("linear", "linear probe (best head)")):
                folder = out / f"seed{seed}" / f"{protocol}-{encoder.name}"
                argv = miniature.probe_argv(encoder, folder, protocol, seed, dataset)
                stages.run(f"{protocol} probe", folder / "eval_results.json", eval_script.main, [*argv, *COMMON])
                scores[row][column].append(accuracy(folder))
            for percent, steps, column in zip(args.label_percents, args.finetune_steps, columns[2:]):
                folder = out / f"seed{seed}" / f"finetune{percent:g}-{encoder.name}"
                argv = miniature.finetune_argv(classifiers[row], folder, percent, seed, steps, dataset)
                stages.run(f"fine-tuning, {percent:g} % labels", folder / "eval_results.json", train_finetune.main, [*argv, *COMMON])
                scores[row][column].append(accuracy(folder))

    results = {
        **measured_by,
        "arguments": vars(args),
        "pretrain_batch_size": miniature.PRETRAIN["per_device_train_batch_size"],
        "scores": scores,
        "seconds": {**stages.seconds, "total": time.time() - start},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results))
    print("\n" + table(results))
    print(f"written to {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
