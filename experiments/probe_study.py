"""The frozen-encoder protocols in miniature (docs/miniature.md): k-NN, the linear-probe grid (its best head) and
the attentive probe, on the demo's two encoders (NEPA-pretrained, random init), with causal and with bidirectional
attention, over seeds (each seed draws its own 10 % labelled subset and the probes' randomness). Every run is
`eval.py` in this process with the settings of experiments/miniature.py, timed.

    python -m experiments.demo                                  # makes outputs/demo/pretrain and outputs/demo/random-init
    python -m experiments.probe_study --seeds 3 --threads 1     # -> outputs/probe_study/results.md and .json
    python -m experiments.probe_study --print docs/figures/probe_study.json   # a saved table, printed

A second run reuses every result that exists.
"""

import argparse
import json
from pathlib import Path

from experiments import miniature
from experiments.runner import (
    CPU_FLAGS, IN_MEMORY, REPO, Stages, add_threads_flag, ensure_dataset, mean_std, print_saved_table, provenance,
    stage_seconds, use_threads,
)  # fmt: skip

PROTOCOLS = {"knn": "k-NN", "linear": "linear (best head)", "attentive": "attentive"}
ATTENTION = {"causal": "True", "bidirectional": "False"}
ENCODERS = {"NEPA-pretrained": "pretrain", "random init": "random-init"}  # folders of experiments.demo
FLAGS = [*CPU_FLAGS, *IN_MEMORY]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", default="outputs/demo", help="where experiments.demo left its encoders")
    parser.add_argument("--dataset", default=miniature.DATASET)
    parser.add_argument("--output_dir", default="outputs/probe_study")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS), help="run only these")
    parser.add_argument("--attention", nargs="+", default=list(ATTENTION), choices=list(ATTENTION), help="run only these")
    add_threads_flag(parser)
    parser.add_argument("--print", metavar="FILE", help="print the table of a results.json this study wrote, and stop")
    args = parser.parse_args(argv)
    if args.print:
        return args
    for name in args.encoders:
        if not (REPO / args.demo_dir / ENCODERS[name] / "model.safetensors").is_file():
            parser.error(f"{REPO / args.demo_dir / ENCODERS[name]} has no encoder: run `python -m experiments.demo` first.")
    return args


def run_probes(args, out: Path, dataset: str, stages: Stages) -> list[dict]:
    """Every probe of every encoder, attention and seed (those with results reused): one record each."""
    import eval as eval_script

    records = []
    for seed in range(args.seeds):
        for encoder_name in args.encoders:
            encoder = REPO / args.demo_dir / ENCODERS[encoder_name]
            for attention in args.attention:
                for protocol in args.protocols:
                    folder = out / f"seed{seed}" / f"{encoder.name}-{attention}-{protocol}"
                    argv = miniature.probe_argv(encoder, folder, protocol, seed, dataset)
                    stages.run(f"seed {seed}, {encoder_name}, {attention}, {protocol}", folder / "eval_results.json",
                               eval_script.main, [*argv, "--is_causal", ATTENTION[attention], *FLAGS])  # fmt: skip
                    metrics = json.loads((folder / "eval_results.json").read_text())
                    records.append(dict(seed=seed, encoder=encoder_name, attention=attention, protocol=protocol,
                                        accuracy=metrics["eval_accuracy"], head=metrics.get("eval_best_head"),
                                        seconds=stage_seconds(folder)))  # fmt: skip
    return records


def table(results: dict) -> str:
    """Top-1 of each encoder, attention and protocol (mean ± std over the seeds), seconds per run, heads chosen, from
    what `main` returns (or wrote to results.json)."""
    arguments, records = results["arguments"], results["records"]
    protocols = arguments["protocols"]

    def cell(encoder, attention, protocol) -> str:
        values = [r["accuracy"] for r in records if (r["encoder"], r["attention"], r["protocol"]) == (encoder, attention, protocol)]
        return mean_std(values) if values else ""

    lines = [
        f"# Frozen-encoder protocols in miniature: Fashion-MNIST, {Path(miniature.PRETRAIN_CONFIG).name}",
        "",
        f"Probes fitted on {miniature.PROBE_LABELS_PERCENT} % of the labels, top-1 % on the 10,000 test images, "
        f"mean ± std over {arguments['seeds']} seeds.",
        "",
        "| encoder | attention | " + " | ".join(PROTOCOLS[p] for p in protocols) + " |",
        "|---|---|" + "---|" * len(protocols),
    ]
    for encoder_name in arguments["encoders"]:
        for attention in arguments["attention"]:
            lines.append(f"| {encoder_name} | {attention} | " + " | ".join(cell(encoder_name, attention, p) for p in protocols) + " |")
    lines += ["", "Seconds per run (mean ± std over all its runs): " + ", ".join(
        f"{PROTOCOLS[p]} {mean_std([r['seconds'] for r in records if r['protocol'] == p], 1.0)} s" for p in protocols)]  # fmt: skip
    heads = sorted({r["head"] for r in records if r["head"]})
    lines += ["", "Best heads chosen: " + ", ".join(f"{h} ({sum(r['head'] == h for r in records)})" for h in heads), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.print:
        return print_saved_table(args.print, table)
    measured_by = provenance("experiments.probe_study", argv)  # the code as the run starts
    use_threads(args.threads)
    out = REPO / args.output_dir
    stages = Stages(keep_times=True)
    records = run_probes(args, out, ensure_dataset(args.dataset, stages), stages)
    results = {**measured_by, "arguments": {k: v for k, v in vars(args).items() if k != "print"}, "records": records}
    out.mkdir(parents=True, exist_ok=True)
    text = table(results)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + text)
    return results


if __name__ == "__main__":
    main()
