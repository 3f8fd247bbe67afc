"""scripts/demo.py end to end at a tiny budget: every stage runs in one process and the table comes out."""

import json
import sys
from pathlib import Path

import pytest
from helpers import small_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import demo  # noqa: E402


@pytest.mark.slow
def test_demo_runs_every_stage_and_a_second_run_reuses_them(tmp_path):
    dataset = small_fashion_mnist(tmp_path / "fashion-mnist")
    argv = [
        "--dataset", str(dataset), "--output_dir", str(tmp_path / "demo"), "--seeds", "2",
        "--pretrain_steps", "2", "--finetune_steps", "2", "--label_percents", "10", "100",
    ]  # fmt: skip
    results = demo.main(argv)

    columns = ["k-NN", "linear probe (best head)", "fine-tuned, 10 % labels", "fine-tuned, 100 % labels"]
    for row in ("NEPA-pretrained", "random init"):
        assert list(results["scores"][row]) == columns
        assert all(len(values) == 2 and all(0 <= value <= 1 for value in values) for values in results["scores"][row].values())
    # Every score is on the whole test split.
    finetuned = json.loads((tmp_path / "demo" / "seed1" / "finetune10-pretrain" / "eval_results.json").read_text())
    assert round(finetuned["eval_runtime"] * finetuned["eval_samples_per_second"]) == 300
    table = (tmp_path / "demo" / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| NEPA-pretrained |", "| random init |"))]
    assert len(rows) == 2 and all(row.count("±") == len(columns) for row in rows)

    again = demo.main(argv)
    assert set(again["seconds"]) == {"start-up", "total"}  # nothing trained or evaluated the second time
    assert again["scores"] == results["scores"]
