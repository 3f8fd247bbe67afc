"""`train_pretrain.py --knn_eval_steps`: a k-NN and RankMe of the weights while they train. The figures land in the
Trainer's logs at the asked steps, `eval.py --protocol knn` on a checkpoint reproduces the figure logged at its step,
the monitoring leaves the training bitwise as it was, the best checkpoint can be chosen by k-NN, and a dataset
without labels gets RankMe alone. A tiny encoder (16 px, 16 patches) on 1,000 + 500 Fashion-MNIST images."""

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import COMMON, small_fashion_mnist, write_config_folder
from PIL import Image
from safetensors.torch import load_file

import eval as eval_script
import train_pretrain
from nepa.data import EvalTransform, image_dataset, sample_rows
from nepa.probes import KnnMonitor

STEPS = ["--max_steps", "40", "--warmup_steps", "5", "--logging_steps", "10", "--save_steps", "20"]
REPO = Path(__file__).resolve().parents[1]
MONITOR = ["--knn_eval_steps", "20", "--knn_train_samples", "1000", "--knn_eval_samples", "500"]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    # Drop path draws from torch's generator every training step: a monitor that moved it would change the weights.
    return write_config_folder(tmp_path_factory.mktemp("config"), drop_path_prob=0.1)


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    """The first 1,000 images of each Fashion-MNIST split."""
    return small_fashion_mnist(tmp_path_factory.mktemp("fashion") / "data", per_split=1000)


def pretrain_argv(config_dir: Path, dataset: list[str], output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config_name", str(config_dir), *dataset, "--output_dir", str(output_dir), "--do_train",
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "50", "--learning_rate", "1e-3",
        "--seed", "3", *COMMON, *STEPS, *extra,
    ]  # fmt: skip


def pretrain(config_dir: Path, dataset: list[str], output_dir: Path, *extra: str) -> dict:
    return train_pretrain.main(pretrain_argv(config_dir, dataset, output_dir, *extra))


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, config_dir, fashion_dir) -> tuple[Path, Path]:
    """The same 40 steps with the monitor every 20 steps, and without it."""
    data = ["--dataset_name", str(fashion_dir), "--load_from_disk", "True"]
    watched, plain = tmp_path_factory.mktemp("watched"), tmp_path_factory.mktemp("plain")
    pretrain(config_dir, data, watched, *MONITOR)
    pretrain(config_dir, data, plain)
    return watched, plain


def test_knn_and_rankme_are_logged_at_the_asked_steps(runs):
    watched, _ = runs
    logged = {entry["step"]: entry for entry in log_history(watched) if "eval_knn_top1" in entry}
    assert sorted(logged) == [20, 40]
    for entry in logged.values():
        # Fashion-MNIST's 10 classes: far above chance (10 %) even after 20 steps.
        assert 0.3 < entry["eval_knn_top1"] <= entry["eval_knn_top5"] <= 1.0
        assert 1.0 <= entry["eval_rankme"] <= 32  # the encoder's width
        # The EMA (on by default) gets its own figures.
        assert 0.0 <= entry["eval_ema_knn_top1"] <= entry["eval_ema_knn_top5"] <= 1.0
        assert 1.0 <= entry["eval_ema_rankme"] <= 32


def test_monitoring_leaves_the_training_bitwise_as_it_was(runs):
    watched, plain = runs
    for name in ("model.safetensors", "model_ema.safetensors"):
        with_monitor, without = load_file(watched / name), load_file(plain / name)
        assert all(torch.equal(with_monitor[key], without[key]) for key in without), name
    losses = [[entry["loss"] for entry in log_history(folder) if "loss" in entry] for folder in (watched, plain)]
    assert losses[0] == losses[1]


def test_eval_py_on_the_checkpoint_gives_the_logged_figure(runs, fashion_dir, tmp_path):
    watched, _ = runs
    logged = next(entry for entry in log_history(watched) if entry["step"] == 40 and "eval_knn_top1" in entry)
    metrics = eval_script.main(
        [
            "--model_name_or_path", str(watched / "checkpoint-40"), "--image_processor_name", str(watched),
            "--dataset_name", str(fashion_dir),
            "--load_from_disk", "True", "--output_dir", str(tmp_path), "--protocol", "knn", "--seed", "3",
            "--max_train_samples", "1000", "--max_eval_samples", "500", "--per_device_eval_batch_size", "50", *COMMON,
        ]
    )  # fmt: skip
    assert metrics["eval_samples"] == 500
    assert abs(metrics["eval_accuracy"] - logged["eval_knn_top1"]) <= 1 / 500
    assert abs(metrics["eval_top5"] - logged["eval_knn_top5"]) <= 1 / 500


def test_two_processes_score_what_one_scores(config_dir, fashion_dir, tmp_path):
    """Under 2 processes each encodes its shard of the bank (500 and 499 of 999 images) and of the queries (250 and
    249); the figures logged are those one process gets from the same weights."""
    data = ["--dataset_name", str(fashion_dir), "--load_from_disk", "True"]
    sizes = ["--knn_eval_steps", "20", "--knn_train_samples", "999", "--knn_eval_samples", "499"]
    argv = pretrain_argv(config_dir, data, tmp_path / "two", *sizes, "--max_steps", "20", "--per_device_train_batch_size", "8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_pretrain.py", *argv]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = next(entry for entry in log_history(tmp_path / "two") if "eval_knn_top1" in entry)
    assert two["step"] == 20
    one = train_pretrain.main(
        [
            "--model_name_or_path", str(tmp_path / "two"), *data, "--output_dir", str(tmp_path / "one"), "--do_eval",
            "--max_eval_samples", "10", "--per_device_eval_batch_size", "50", "--seed", "3", *sizes, *COMMON,
        ]
    )  # fmt: skip
    for name in ("knn_top1", "knn_top5", "ema_knn_top1", "ema_knn_top5"):
        assert one[f"eval_{name}"] == two[f"eval_{name}"], name
    for name in ("rankme", "ema_rankme"):
        assert one[f"eval_{name}"] == pytest.approx(two[f"eval_{name}"], rel=1e-6), name


def test_the_best_checkpoint_is_chosen_by_knn(config_dir, fashion_dir, tmp_path):
    data = ["--dataset_name", str(fashion_dir), "--load_from_disk", "True"]
    best = ["--metric_for_best_model", "knn_top1", "--load_best_model_at_end", "True", "--eval_strategy", "steps"]
    best += ["--eval_steps", "20", "--max_eval_samples", "50", "--use_ema", "False"]
    pretrain(config_dir, data, tmp_path, *MONITOR, *best)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    figures = {entry["step"]: entry["eval_knn_top1"] for entry in state["log_history"] if "eval_knn_top1" in entry}
    step = max(figures, key=lambda step: (figures[step], -step))  # the Trainer keeps the first of equals
    assert state["best_metric"] == figures[step]
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{step}"
    saved, best_weights = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / f"checkpoint-{step}" / "model.safetensors")
    assert all(torch.equal(saved[key], best_weights[key]) for key in best_weights)


def test_a_dataset_without_labels_gets_rankme_alone(config_dir, tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    generator = np.random.default_rng(0)
    for index in range(40):
        Image.fromarray(generator.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    data = ["--train_dir", str(folder), "--cache_dir", str(tmp_path / "cache")]
    with caplog.at_level(logging.WARNING):
        pretrain(config_dir, data, tmp_path / "out", "--knn_eval_steps", "20", "--max_steps", "20")
    assert "k-NN needs labels" in caplog.text
    logged = [entry for entry in log_history(tmp_path / "out") if "eval_rankme" in entry]
    assert [entry["step"] for entry in logged] == [20]
    assert not any("knn" in name for entry in logged for name in entry)


def test_the_monitor_gives_back_every_random_state_and_the_training_mode(config_dir, fashion_dir, tmp_path):
    """The monitor loads images in this process (no workers), which reseeds `random` and numpy per image."""
    split = datasets.load_from_disk(str(fashion_dir))
    data_args = train_pretrain.DataArguments()
    bank = image_dataset(split["train"].select(range(20)), EvalTransform(16), data_args)
    queries = image_dataset(split["validation"].select(range(10)), EvalTransform(16), data_args)
    argv = ["--config_name", str(config_dir), "--output_dir", str(tmp_path), *COMMON, "--per_device_eval_batch_size", "8"]
    model_args, _, training_args, _ = train_pretrain.parse_arguments(
        (train_pretrain.ModelArguments, train_pretrain.DataArguments, train_pretrain.NepaTrainingArguments, train_pretrain.MonitorArguments),
        argv,
    )
    model = train_pretrain.build_model(model_args)
    trainer = train_pretrain.NepaPretrainer(model=model, args=training_args, **train_pretrain.image_inputs(
        train_pretrain.load_image_processor(None, str(config_dir))
    ))  # fmt: skip
    model.train()
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    metrics = KnnMonitor(bank, queries, 10).evaluate(trainer, "eval")
    after = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    assert set(metrics) >= {"eval_knn_top1", "eval_rankme", "eval_ema_knn_top1"}
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
    assert model.training


def test_subsets_are_seeded_and_class_balanced():
    labels = np.repeat(np.arange(10), [100] * 9 + [3])  # a sorted split; the last class is small
    features = datasets.Features({"label": datasets.ClassLabel(10), "row": datasets.Value("int64")})
    split = datasets.Dataset.from_dict({"label": labels, "row": np.arange(len(labels))}, features=features)

    def rows(size: int, seed: int) -> list[int]:
        return list(sample_rows(split, size, seed)["row"])

    counts = np.bincount(labels[rows(93, 0)], minlength=10)
    assert counts[-1] == 3 and set(counts[:-1]) == {10}  # the small class gives all it has, the others share the rest
    assert rows(93, 0) == rows(93, 0) and rows(93, 0) != rows(93, 1)
    unlabelled = split.remove_columns("label")
    assert list(sample_rows(unlabelled, 93, 0)["row"]) != list(range(93))  # a random pick, not the first rows


def test_the_label_column_is_taken_for_the_knn_and_refused_without_it():
    """The monitor reads labels from --label_column_name; without --knn_eval_steps nothing does."""
    import train_pretrain
    from nepa.args import DataArguments, parse_arguments

    classes = (train_pretrain.ModelArguments, DataArguments, train_pretrain.NepaTrainingArguments, train_pretrain.MonitorArguments)
    argv = ["--output_dir", "out", "--label_column_name", "fine_label"]
    _, data_args, _, _ = parse_arguments(classes, [*argv, "--knn_eval_steps", "5"], train_pretrain.FLAG_USES)
    assert data_args.label_column_name == "fine_label"
    with pytest.raises(ValueError, match="^--label_column_name is used only with --knn_eval_steps"):
        parse_arguments(classes, argv, train_pretrain.FLAG_USES)
