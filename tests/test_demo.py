"""experiments.demo end to end at a tiny budget: every stage runs in one process and the table comes out; the
runner every study shares (experiments/runner.py)."""

import json
import re
import shlex
from pathlib import Path

import pytest
from helpers import small_fashion_mnist

from experiments import demo
from experiments.runner import Stages, mean_std


def test_a_stage_runs_once_and_is_timed_by_kind(tmp_path):
    calls = []

    def stage(argv):
        calls.append(argv)
        (tmp_path / argv[0]).write_text("done")
        return "ran"

    stages = Stages()
    assert stages.run("probe", tmp_path / "a", stage, ["a"]) == "ran"
    assert stages.run("probe", tmp_path / "b", stage, ["b"]) == "ran"
    assert stages.run("probe", tmp_path / "a", stage, ["a"]) is None  # its result exists
    assert calls == [["a"], ["b"]] and list(stages.seconds) == ["probe"]
    assert Stages(rerun=True).run("probe", tmp_path / "a", stage, ["a"]) == "ran"


def test_ablation_rows_pretrain_and_probe_with_the_miniature_settings():
    """experiments.ablations pretrains and probes every row as the demo does (experiments/miniature.py), the row's
    switches aside: probes fitted on the 10 % labelled subset and scored on the whole test split."""
    from experiments import ablations, miniature

    import train_pretrain
    from nepa.args import DataArguments, NepaTrainingArguments, parse_arguments

    args = ablations.parse_args(["--table", "shift", "--max_steps", "60"])
    command = ablations.pretrain_command(args, {"nepa_shift": False}, Path("unused"), 1338)
    assert command[0] == "train_pretrain.py"
    model_args, data_args, training_args = parse_arguments(
        (train_pretrain.ModelArguments, DataArguments, NepaTrainingArguments), command[1:]
    )
    for name, value in miniature.PRETRAIN.items():
        parsed = getattr(training_args, name) if hasattr(training_args, name) else getattr(data_args, name)
        assert parsed == (list(value) if isinstance(value, tuple) else value), name
    assert model_args.config_overrides == "nepa_shift=false" and training_args.max_steps == 60 and training_args.seed == 1338

    import eval as eval_script

    probe = ablations.probe_command(args, "linear", Path("unused"), Path("unused"), 1338)
    assert probe[0] == "eval.py"
    eval_args, data_args, training_args = parse_arguments(
        (eval_script.EvalArguments, DataArguments, eval_script.EvalTrainingArguments), probe[1:]
    )
    assert data_args.labels_per_class == miniature.PROBE_LABELS_PERCENT / 100
    assert data_args.max_train_samples is None and data_args.max_eval_samples is None
    assert eval_args.crop_pct == miniature.EVAL["crop_pct"] and training_args.num_train_epochs == miniature.PROBE_LINEAR["num_train_epochs"]
    assert data_args.crop_scale == list(miniature.PROBE_LINEAR["crop_scale"]) and training_args.seed == 1338


def test_mean_std_of_no_one_and_several_seeds():
    assert mean_std([]) == "-"
    assert mean_std([0.5]) == "50.0"  # one seed: no spread to show
    assert mean_std([0.5, 0.7]) == "60.0 ± 14.1"
    assert mean_std([-0.61234, -0.61236], scale=1, digits=4) == "-0.6123 ± 0.0000"


@pytest.mark.slow
def test_demo_runs_every_stage_and_a_second_run_reuses_them(tmp_path, capsys):
    dataset = small_fashion_mnist(tmp_path / "fashion-mnist")
    argv = [
        "--dataset", str(dataset), "--output_dir", str(tmp_path / "demo"), "--seeds", "2",
        "--pretrain_steps", "2", "--finetune_steps", "2", "3", "--label_percents", "10", "100",
    ]  # fmt: skip
    results = demo.main(argv)

    columns = ["k-NN", "linear probe (best head)", "fine-tuned, 10 % labels", "fine-tuned, 100 % labels"]
    for row in ("NEPA-pretrained", "random init"):
        assert list(results["scores"][row]) == columns
        assert all(len(values) == 2 and all(0 <= value <= 1 for value in values) for values in results["scores"][row].values())
    # Every score is on the whole test split.
    finetuned = json.loads((tmp_path / "demo" / "seed1" / "finetune10-pretrain" / "eval_results.json").read_text())
    assert round(finetuned["eval_runtime"] * finetuned["eval_samples_per_second"]) == 300
    # --finetune_steps gives each labelled fraction its own budget.
    for percent, steps in (("10", 2), ("100", 3)):
        state = json.loads((tmp_path / "demo" / "seed1" / f"finetune{percent}-pretrain" / "trainer_state.json").read_text())
        assert state["global_step"] == steps
    table = (tmp_path / "demo" / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| NEPA-pretrained |", "| random init |"))]
    assert len(rows) == 2 and all(row.count("±") == len(columns) for row in rows)
    # The results say which code and command measured them, and print the same table again.
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}(\+changes)?", saved["commit"])
    assert saved["command"] == shlex.join(["python", "-m", "experiments.demo", *argv])  # the study's call, not the process's
    assert f"Commit {saved['commit']}" in table
    capsys.readouterr()
    demo.main(["--table", str(tmp_path / "demo" / "results.json")])
    assert capsys.readouterr().out.strip() == table.strip()

    again = demo.main(argv)
    assert set(again["seconds"]) == {"start-up", "total"}  # nothing trained or evaluated the second time
    assert again["scores"] == results["scores"]


def test_the_demo_fine_tunes_with_its_own_budget_unless_told_otherwise():
    """The demo's fine-tunes take miniature.DEMO_FINETUNE_STEPS (the split measured in docs/miniature.md); the
    studies keep the protocol's FINETUNE_STEPS; --finetune_steps takes one value or one per fraction."""
    from experiments import miniature
    from experiments.runner import finetune_budget

    args = demo.parse_args([])
    assert finetune_budget(args.finetune_steps, args.label_percents, miniature.DEMO_FINETUNE_STEPS) == {1: 150, 10: 300}
    assert finetune_budget(None, [1, 10]) == {1: 300, 10: 600}
    assert finetune_budget([7], [1, 10]) == {1: 7, 10: 7} and finetune_budget([7, 8], [1, 10]) == {1: 7, 10: 8}
    with pytest.raises(SystemExit):
        demo.parse_args(["--finetune_steps", "1", "2", "3"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--label_percents", "5"])  # no budget for 5 %
