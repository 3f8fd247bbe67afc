"""experiments.layer_decay end to end at a tiny budget: one pretraining, three schedules fine-tuned alike, the table."""

import json
import shlex

import pytest
from helpers import small_fashion_mnist

from experiments import layer_decay


@pytest.mark.slow
def test_layer_decay_fine_tunes_each_schedule_on_the_same_encoder(tmp_path):
    dataset = small_fashion_mnist(tmp_path / "fashion-mnist", per_split=1000)
    out = tmp_path / "decay"
    argv = ["--dataset", str(dataset), "--output_dir", str(out), "--pretrain_steps", "2", "--seeds", "2"]
    argv += ["--finetune_steps", "3", "--threads", "1"]
    results = layer_decay.main(argv)

    assert results["command"] == shlex.join(["python", "-m", "experiments.layer_decay", *argv])
    assert len(results["commit"].removesuffix("+changes")) == 40
    assert set(results["scores"]) == set(layer_decay.SCHEDULES)
    assert all(len(values) == 2 for by_percent in results["scores"].values() for values in by_percent.values())
    # Each schedule ran as its flags say, on the one converted encoder.
    state = json.loads((out / "final" / "seed1" / "finetune10-schedule1" / "trainer_state.json").read_text())
    ramp = [entry["layer_decay"] for entry in state["log_history"] if "layer_decay" in entry]
    assert ramp and ramp[0] == pytest.approx(0.35) and ramp == sorted(ramp)
    constant = json.loads((out / "final" / "seed1" / "finetune10-schedule0" / "trainer_state.json").read_text())
    assert not any("layer_decay" in entry for entry in constant["log_history"])
    assert json.loads((out / "pretrain" / "trainer_state.json").read_text())["max_steps"] == 2

    again = layer_decay.main(argv)  # every stage reused: the same scores and times
    assert again["scores"] == results["scores"] and again["minutes"] == pytest.approx(results["minutes"])
    text = layer_decay.table(results)
    assert "| ramp 0.35 -> 1.0 (paper) |" in text and "| ramp minus constant, paired by seed |" in text
