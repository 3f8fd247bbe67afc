"""The paper's three ablation tables in miniature: pretrain one encoder per row, probe it, tabulate.

    python -m experiments.ablations --table shift          # shift / causal masking / stop-gradient
    python -m experiments.ablations --table masking        # input masking ratio 0 / 0.4 / 0.6
    python -m experiments.ablations --table components     # LayerScale, RoPE, QK-norm, gated MLP
    python -m experiments.ablations --print docs/figures/ablations/shift.json   # a saved table, printed

Each row changes the base config (--config) only through `train_pretrain.py --config_overrides`,
and is measured as the demo measures its encoder, with the settings of experiments/miniature.py (the
command lines of `miniature.pretrain_argv`, `convert_argv`, `probe_argv` and `finetune_argv`): pretraining for
--max_steps with the same seeds as every other row, `eval.py --protocol knn` and `--protocol linear`
on the frozen encoder fitted on 10 % of the labels (class-balanced, seeded) and, with --finetune, the
demo's fine-tune on 10 % of the labels; every score is top-1 on the whole test split. --seeds N
repeats every row with N seeds (pretraining, probes and fine-tune) and the table gives mean ± std.
The table, beside the paper's ImageNet figures, is printed and written to `<output_dir>/<table>.md`; its figures,
per row and seed, with the commit and command that measured them, to `<output_dir>/<table>.json`.

A stage whose results exist is not run again (a failed pretraining counts as a result: its error is
kept in `failed.txt`); --rerun starts the table's rows from scratch, and rows run with other
settings (the miniature's included) are refused.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from experiments import miniature
from experiments.runner import (
    REPO, Stages, StageFailed, device_flags, ensure_dataset, mean_std, print_saved_table, provenance, read_json,
    run_entry_point,
)  # fmt: skip

DEFAULT_DATASET = miniature.DATASET
FINETUNE_PERCENT = 10  # the semi-supervised protocol of the demo
LAYERSCALE = 1e-5  # the released configs' initial LayerScale
COLLAPSE_COSINE = 0.9  # targets this alike carry almost no information about the image

# (switch columns, paper's ImageNet ViT-B fine-tuned top-1 (docs/recipes.md), config overrides) per row.
COMPONENTS_OFF = {"layerscale_value": None, "use_rope": False, "qk_norm": False, "use_gated_mlp": False}
SWIGLU = {"use_gated_mlp": True, "hidden_act": "silu"}  # intermediate_size kept: 1.5x the MLP weights
TABLES = {
    "shift": {
        "columns": ("shift", "causal", "stop-grad"),
        "paper": "50k-step top-1",
        "rows": [
            (("no", "yes", "yes"), "fails", {"nepa_shift": False}),
            (("yes", "no", "yes"), "73.6", {"is_causal": False}),
            (("yes", "yes", "no"), "fails (collapse)", {"nepa_stop_grad": False}),
            (("yes", "yes", "yes"), "76.8", {}),
        ],
    },
    "masking": {
        "columns": ("input masking ratio",),
        "paper": "top-1",
        "rows": [
            (("0 %",), "78.2", {"nepa_mask_ratio": 0.0}),
            (("40 %",), "76.4", {"nepa_mask_ratio": 0.4}),
            (("60 %",), "75.7", {"nepa_mask_ratio": 0.6}),
        ],
    },
    "components": {
        "columns": ("LayerScale", "RoPE", "QK-norm", "GatedMLP"),
        "paper": "100k-step top-1",
        "rows": [
            (("-", "-", "-", "-"), "78.2", COMPONENTS_OFF),
            (("yes", "-", "-", "-"), "77.4", {**COMPONENTS_OFF, "layerscale_value": LAYERSCALE}),
            (("yes", "yes", "-", "-"), "80.2", {**COMPONENTS_OFF, "layerscale_value": LAYERSCALE, "use_rope": True}),
            (
                ("yes", "yes", "yes", "-"),
                "fails",
                {**COMPONENTS_OFF, "layerscale_value": LAYERSCALE, "use_rope": True, "qk_norm": True},
            ),
            (
                ("yes", "yes", "-", "yes"),
                "81.1",
                {**COMPONENTS_OFF, "layerscale_value": LAYERSCALE, "use_rope": True, **SWIGLU},
            ),
            (
                ("yes", "yes", "yes", "yes"),
                "81.3",
                {"layerscale_value": LAYERSCALE, "use_rope": True, "qk_norm": True, **SWIGLU},
            ),
        ],
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES))
    parser.add_argument("--print", metavar="FILE", help="print the table saved in FILE (a <table>.json) and stop")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="a download_dataset.py folder")
    parser.add_argument("--config", default=miniature.PRETRAIN_CONFIG, help="the base pretraining config")
    parser.add_argument("--max_steps", type=int, default=200, help="pretraining steps of every row (the rest: experiments/miniature.py)")
    parser.add_argument(
        "--finetune", action="store_true",
        help=f"fine-tune each row on {FINETUNE_PERCENT} %% of the labels ({miniature.FINETUNE_STEPS[FINETUNE_PERCENT]} steps, experiments/miniature.py)",
    )  # fmt: skip
    parser.add_argument("--output_dir", default="outputs/ablations")
    parser.add_argument("--seed", type=int, default=1337, help="the first seed; --seeds N uses seed, seed + 1, ...")
    parser.add_argument("--seeds", type=int, default=1, help="runs of every row, for mean ± std")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: torch's choice, all cores); on a CPU shared with other work, 1 is "
        "several times faster than threads contending for the cores",
    )
    parser.add_argument("--rerun", action="store_true", help="delete this table's row folders and run them again")
    args = parser.parse_args(argv)
    if not args.table and not args.print:
        parser.error("give --table (to run one) or --print FILE (to show a saved one)")
    return args


def format_overrides(overrides: dict) -> str:
    return ",".join(f"{key}={json.dumps(value)}" for key, value in overrides.items())


def pretrain_command(args, overrides: dict, output: Path, seed: int) -> list[str]:
    """The miniature's pretraining (experiments/miniature.py) of the row's config, for --max_steps."""
    argv = miniature.pretrain_argv(
        output, args.max_steps, seed, args.dataset, args.config, format_overrides(overrides), max(1, args.max_steps // 30)
    )
    return ["train_pretrain.py", *argv, *device_flags()]


def probe_command(args, protocol: str, encoder: Path, output: Path, seed: int) -> list[str]:
    """The demo's probe (experiments/miniature.py): fitted on its labelled subset, scored on the whole test split."""
    return ["eval.py", *miniature.probe_argv(encoder, output, protocol, seed, args.dataset), *device_flags()]


def finetune_commands(args, encoder: Path, classifier: Path, output: Path, seed: int) -> list[list[str]]:
    """The conversion (the encoder's own config, the dataset's class count) and the demo's fine-tune."""
    convert = miniature.convert_argv(encoder, classifier, config=None, dataset=args.dataset)
    finetune = miniature.finetune_argv(classifier, output, FINETUNE_PERCENT, seed, dataset=args.dataset)
    return [["init_nepa_cls_from_pretrain.py", *convert], ["train_finetune.py", *finetune, *device_flags()]]


def run_seed(args, stages: Stages, seed_dir: Path, overrides: dict, seed: int) -> None:
    """Run the stages of one seed of a row that have no results yet; a failing stage ends that seed."""
    seed_dir.mkdir(parents=True, exist_ok=True)
    failed = seed_dir / "failed.txt"
    if failed.exists():
        return
    encoder = seed_dir / "pretrain"
    plan = [("pretrain", encoder / "trainer_state.json", [pretrain_command(args, overrides, encoder, seed)])]
    for protocol in ("knn", "linear"):
        command = probe_command(args, protocol, encoder, seed_dir / protocol, seed)
        plan.append((protocol, seed_dir / protocol / "eval_results.json", [command]))
    if args.finetune:
        commands = finetune_commands(args, encoder, seed_dir / "cls", seed_dir / "finetune", seed)
        plan.append(("finetune", seed_dir / "finetune" / "eval_results.json", commands))
    for name, result, commands in plan:
        for command in commands:
            try:
                stages.run(name, result, run_entry_point, command, seed_dir / f"{name}.log", args.threads)
            except StageFailed as error:
                failed.write_text(f"{name}: {error}\n")
                print(f"\n{seed_dir}: {name} failed ({error}); going on.", flush=True)
                return


def seed_dirs(args, row_dir: Path) -> list[tuple[int, Path]]:
    return [(args.seed + index, row_dir / f"seed{args.seed + index}") for index in range(args.seeds)]


def run_row(args, stages: Stages, row_dir: Path, overrides: dict) -> None:
    row_dir.mkdir(parents=True, exist_ok=True)
    # Settings that change a row's results; --finetune and more --seeds may be added to finished rows later.
    later = ("finetune", "seeds")
    settings = {key: value for key, value in vars(args).items() if key not in ("table", "rerun", "output_dir", "threads")}
    # The miniature's settings the rows were run with, as the file holds them.
    miniature_settings = dict(pretrain=miniature.PRETRAIN, probes=miniature.PROBES, probe_labels=miniature.PROBE_LABELS_PERCENT)
    settings["miniature"] = json.loads(json.dumps(miniature_settings))
    settings_file = row_dir / "settings.json"
    previous = read_json(settings_file)
    changed = sorted(key for key in settings if previous and key not in later and previous.get(key) != settings[key])
    if changed:
        raise SystemExit(f"{row_dir} was run with other {', '.join(changed)}: pass --rerun, or another --output_dir.")
    settings_file.write_text(json.dumps(settings, indent=2))
    for seed, seed_dir in seed_dirs(args, row_dir):
        run_seed(args, stages, seed_dir, overrides, seed)


def tail_mean(log_history: list[dict], key: str, count: int = 3) -> float | None:
    values = [entry[key] for entry in log_history if key in entry]
    return sum(values[-count:]) / len(values[-count:]) if values else None


def seed_summary(seed_dir: Path) -> dict:
    state = read_json(seed_dir / "pretrain" / "trainer_state.json") or {}
    history = state.get("log_history", [])
    runtime = [entry["train_runtime"] for entry in history if "train_runtime" in entry]
    accuracy = {}
    for name, key in (("knn", "eval_accuracy"), ("linear", "eval_accuracy"), ("finetune", "eval_accuracy")):
        results = read_json(seed_dir / name / "eval_results.json")
        accuracy[name] = results.get(key) if results else None
    failed = seed_dir / "failed.txt"
    return {
        "loss": tail_mean(history, "loss"),
        "target_cosine": tail_mean(history, "target_cosine"),
        "minutes": runtime[-1] / 60 if runtime else None,
        "failed": failed.read_text().strip() if failed.exists() else None,
        **accuracy,
    }


def verdict(summary: dict) -> str:
    if summary["failed"]:
        return f"fails ({summary['failed']})"
    if summary["loss"] is None:
        return "not run"
    if summary["loss"] != summary["loss"]:
        return "fails (NaN loss)"
    if summary["target_cosine"] is not None and summary["target_cosine"] >= COLLAPSE_COSINE:
        return "collapse"
    return "trains"


def number(summaries: list[dict], key: str, scale: float = 1.0, digits: int = 3) -> str:
    """One seed's value, or mean ± std over the seeds that have it ("-" if none)."""
    return mean_std([summary[key] for summary in summaries if summary[key] is not None], scale, digits)


def markdown_table(results: dict) -> str:
    """The table of a saved `<table>.json`: each row's switches and paper figure, then its measures over the seeds."""
    finetune = results["finetune"]
    header = [*results["columns"], f"paper ({results['paper']})", "outcome", "final NEPA loss", "target_cosine"]
    header += ["k-NN top-1", "linear top-1"] + ([f"fine-tune top-1 ({FINETUNE_PERCENT} % labels)"] if finetune else [])
    header += ["pretrain min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["rows"]:
        summaries = row["seeds"]
        outcomes = " / ".join(dict.fromkeys(verdict(summary) for summary in summaries))
        cells = [*row["switches"], row["paper"], outcomes, number(summaries, "loss", digits=4), number(summaries, "target_cosine")]
        cells += [number(summaries, "knn", 100, 1), number(summaries, "linear", 100, 1)]
        cells += [number(summaries, "finetune", 100, 1)] if finetune else []
        cells.append(number(summaries, "minutes", digits=1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def row_name(overrides: dict) -> str:
    return "base" if not overrides else "_".join(f"{key}-{value}" for key, value in overrides.items()).replace(".", "p")


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.print:
        return print_saved_table(args.print, markdown_table)
    started, stages = time.time(), Stages()
    ensure_dataset(args.dataset, stages)
    if not (REPO / args.config / "config.json").is_file() and not (Path(args.config) / "config.json").is_file():
        raise SystemExit(f"--config {args.config} has no config.json.")
    table = TABLES[args.table]
    table_dir = Path(args.output_dir).resolve() / args.table
    row_dirs = [table_dir / f"{index}_{row_name(overrides)}" for index, (_, _, overrides) in enumerate(table["rows"])]
    for row_dir, (switches, _, overrides) in zip(row_dirs, table["rows"]):
        if args.rerun and row_dir.exists():
            shutil.rmtree(row_dir)
        print(f"\n=== {args.table}: {' / '.join(table['columns'])} = {' / '.join(switches)}  ({row_dir.name})", flush=True)
        run_row(args, stages, row_dir, overrides)

    results = {
        "table": args.table, **provenance("experiments.ablations", argv),
        "columns": table["columns"], "paper": table["paper"], "finetune": args.finetune,
        "rows": [
            {"switches": switches, "paper": paper, "overrides": overrides,
             "seeds": [{"seed": seed, **seed_summary(seed_dir)} for seed, seed_dir in seed_dirs(args, row_dir)]}
            for row_dir, (switches, paper, overrides) in zip(row_dirs, table["rows"])
        ],
    }  # fmt: skip
    (table_dir.parent / f"{args.table}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown_table(results)
    (table_dir.parent / f"{args.table}.md").write_text(text + "\n")
    print(f"\n{text}\n\nwritten to {table_dir.parent / f'{args.table}.md'} ({(time.time() - started) / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
