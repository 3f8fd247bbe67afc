"""experiments.pretraining_length end to end at a tiny budget: the curve's results, the collapse run, the figure."""

import json

import pytest
from helpers import small_fashion_mnist

from experiments import pretraining_length


@pytest.mark.slow
def test_pretraining_length_judges_each_checkpoint_and_plots(tmp_path):
    dataset = small_fashion_mnist(tmp_path / "fashion-mnist", per_split=1000)
    out = tmp_path / "curve"
    argv = [
        "--dataset", str(dataset), "--output_dir", str(out), "--steps", "2", "4", "--collapse_steps", "2", "4",
        "--seeds", "1", "--finetune_steps", "2", "--long_factor", "2", "--long_seeds", "1", "--causal_seeds", "1",
        "--threads", "1",
    ]  # fmt: skip
    results = pretraining_length.main(argv)

    # One pretraining per run, checkpoints at the judged steps, under one schedule sized for the longest.
    for run, steps in (("stopgrad", [2, 4]), ("nostopgrad", [2, 4])):
        state = json.loads((out / run / "pretrain" / "trainer_state.json").read_text())
        assert state["max_steps"] == 4
        assert all((out / run / "pretrain" / f"checkpoint-{step}" / "preprocessor_config.json").exists() for step in steps)
    assert json.loads((out / "nostopgrad" / "pretrain" / "config.json").read_text())["nepa_stop_grad"] is False

    encoders = results["encoders"]
    assert {name: entry["pretraining_steps"] for name, entry in encoders.items()} == {"random-init": 0, "steps2": 2, "steps4": 4}
    for name, entry in encoders.items():
        variants = {"finetune1-long", "finetune10-long", "finetune1-causal", "finetune10-causal"} if name != "steps2" else set()
        assert set(entry["scores"]) == {"knn", "linear", "attentive", "finetune1", "finetune10"} | variants
        assert all(len(values) == 1 for values in entry["scores"].values())
    # The long fine-tune runs long_factor x the demo's steps; the causal one keeps pretraining's attention.
    seed0 = out / "steps4" / "seed0"
    assert json.loads((seed0 / "finetune10-long" / "trainer_state.json").read_text())["global_step"] == 4
    assert json.loads((seed0 / "finetune10" / "trainer_state.json").read_text())["global_step"] == 2
    assert json.loads((seed0 / "finetune10-causal" / "config.json").read_text())["is_causal"] is True
    assert json.loads((seed0 / "finetune10" / "config.json").read_text())["is_causal"] is False

    for run in ("stopgrad", "nostopgrad"):
        assert set(results["collapse"][run]["knn"]) == {2, 4}
    assert results["collapse"]["nostopgrad"]["target_cosine"]
    assert set(results["collapse"]["stopgrad"]["layerscale"]) == {2, 4}
    assert all(minutes > 0 for minutes in results["minutes"].values())

    again = pretraining_length.main(argv)  # every stage reused: no new wall times, the same scores
    assert again["encoders"] == json.loads(json.dumps(results["encoders"]))
    assert again["minutes"] == pytest.approx(results["minutes"])

    text = pretraining_length.table(results)
    assert "| NEPA, 4 steps |" in text and "| causal attention kept |" in text

    figure = tmp_path / "curve.png"
    pretraining_length.main(["--output_dir", str(out), "--plot", "--figure", str(figure)])
    assert figure.stat().st_size > 10_000


def test_a_finetune_budget_that_fits_no_fraction_stops_before_the_pretraining(capsys):
    """--finetune_steps takes one value or one per fraction (1 % and 10 %); three are refused at parse time, before
    hours of pretraining, not when the fine-tunes start."""
    assert pretraining_length.parse_args(["--finetune_steps", "7"]).finetune_steps == [7]
    with pytest.raises(SystemExit):
        pretraining_length.parse_args(["--finetune_steps", "1", "2", "3"])
    assert "one per labelled fraction (2); got 3" in capsys.readouterr().err
