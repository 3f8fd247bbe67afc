"""The frozen-encoder protocols in miniature (docs/miniature.md): k-NN, the linear-probe grid (its best head) and
the attentive probe, on the demo's two encoders (NEPA-pretrained, random init), with causal and with bidirectional
attention, over seeds (each seed draws its own 10 % labelled subset and the probes' randomness). Every run is
`eval.py` in this process with the settings of scripts/miniature.py, timed.

    python scripts/demo.py                                  # makes outputs/demo/pretrain and outputs/demo/random-init
    python scripts/probe_study.py --seeds 3 --threads 1     # -> outputs/probe_study/results.md and .json
    python scripts/probe_study.py --print docs/figures/probe_study.json   # a saved table, printed

A second run reuses every result that exists.
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts import miniature  # noqa: E402
from scripts.demo import COMMON  # noqa: E402
from scripts.experiment import mean_std, print_saved_table, provenance  # noqa: E402

PROTOCOLS = {"knn": "k-NN", "linear": "linear (best head)", "attentive": "attentive"}
ATTENTION = {"causal": "True", "bidirectional": "False"}
ENCODERS = {"NEPA-pretrained": "pretrain", "random init": "random-init"}  # folders of scripts/demo.py


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", default="outputs/demo", help="where scripts/demo.py left its encoders")
    parser.add_argument("--output_dir", default="outputs/probe_study")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS), help="run only these")
    parser.add_argument("--attention", nargs="+", default=list(ATTENTION), choices=list(ATTENTION), help="run only these")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--print", metavar="FILE", help="print the table of a results.json this script wrote, and stop")
    args = parser.parse_args(argv)
    if args.print:
        return print_saved_table(args.print, table)
    measured_by = provenance("scripts/probe_study.py", argv)

    import torch

    import eval as eval_script

    if args.threads:
        torch.set_num_threads(args.threads)
    demo, out = REPO / args.demo_dir, REPO / args.output_dir
    encoders = {name: demo / ENCODERS[name] for name in args.encoders}
    for folder in encoders.values():
        if not (folder / "model.safetensors").is_file():
            parser.error(f"{folder} has no encoder: run `python scripts/demo.py` first.")
    records = []
    for seed in range(args.seeds):
        for encoder_name, encoder in encoders.items():
            for attention in args.attention:
                is_causal = ATTENTION[attention]
                for protocol in args.protocols:
                    folder = out / f"seed{seed}" / f"{encoder.name}-{attention}-{protocol}"
                    result = folder / "eval_results.json"
                    if not result.exists():
                        print(f"==> seed {seed}, {encoder_name}, {attention}, {protocol}", flush=True)
                        start = time.time()
                        argv = miniature.probe_argv(encoder, folder, protocol, seed, str(REPO / miniature.DATASET))
                        eval_script.main([*argv, "--is_causal", is_causal, *COMMON])
                        (folder / "seconds.json").write_text(json.dumps({"seconds": time.time() - start}))
                    metrics = json.loads(result.read_text())
                    seconds = json.loads((folder / "seconds.json").read_text())["seconds"]
                    records.append(dict(seed=seed, encoder=encoder_name, attention=attention, protocol=protocol,
                                        accuracy=metrics["eval_accuracy"], head=metrics.get("eval_best_head"), seconds=seconds))  # fmt: skip

    results = {**measured_by, "arguments": {k: v for k, v in vars(args).items() if k != "print"}, "records": records}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table(results))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table(results))
    return results


def table(results: dict) -> str:
    """The study's table in Markdown, from what `main` returns (or wrote to results.json)."""
    arguments, records = results["arguments"], results["records"]
    protocols = arguments["protocols"]

    def cell(encoder, attention, protocol, key="accuracy", scale=100.0) -> str:
        values = [r[key] for r in records if (r["encoder"], r["attention"], r["protocol"]) == (encoder, attention, protocol)]
        return mean_std(values, scale) if values else ""

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


if __name__ == "__main__":
    main()
