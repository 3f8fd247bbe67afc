"""The frozen-encoder protocols of eval.py (nepa/probes.py): k-NN with the train features sharded across processes,
and the linear and attentive probe grids under the Trainer. Two processes (gloo on the CPU) give the metrics of one,
each process keeps only its shard of the k-NN features, every head of a grid trains as if alone, and a killed probe
resumes from its checkpoint. Tiny 4-block encoders on generated images."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import COMMON, build_image_dataset, write_config_folder
from safetensors.torch import load_file
from transformers import ViTImageProcessor

import eval as eval_script
from models.vit_nepa import ViTNepaConfig, ViTNepaForPreTraining
from nepa.checkpoint import CHECKPOINT_COMPLETE
from nepa.probes import KnnBank, load_frozen_encoder, pooled_features

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

# eval.py's k-NN and linear protocols in one launch (one start-up), KnnBank.build recording, per process, the rows
# of the feature bank it keeps. argv: the k-NN command line, "--", the linear probe's.
KNN_THEN_LINEAR = """\
import json, os, sys
import eval as eval_script
from nepa import probes

build = probes.KnnBank.build.__func__

def recording(cls, trainer, dataset, num_classes):
    bank = build(cls, trainer, dataset, num_classes)
    record = {"rows": bank.features.shape[0], "split": len(dataset), "processes": trainer.args.world_size}
    os.makedirs(trainer.args.output_dir, exist_ok=True)  # process 0 makes it, maybe later than this process
    with open(os.path.join(trainer.args.output_dir, f"bank_{trainer.args.process_index}.json"), "w") as file:
        json.dump(record, file)
    return bank

probes.KnnBank.build = classmethod(recording)
split = sys.argv.index("--")
eval_script.main(sys.argv[1:split])
eval_script.main(sys.argv[split + 1 :])
"""
KNN_FLAGS = ["--protocol", "knn", "--knn_k", "20", "5", "--max_train_samples", "23"]
LINEAR_FLAGS = ["--protocol", "linear", "--num_train_epochs", "2", "--probe_lrs", "0.01", "0.1", "1.0", "--max_grad_norm", "1.0"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """An untrained 4-block ViT-NEPA saved as a pretraining output (16 px images, 16 patches)."""
    folder = tmp_path_factory.mktemp("encoder")
    write_config_folder(folder, num_hidden_layers=4)
    torch.manual_seed(0)
    ViTNepaForPreTraining(ViTNepaConfig.from_pretrained(folder)).save_pretrained(folder)
    ViTImageProcessor.from_pretrained(folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """3 classes: 24 training and 15 validation images."""
    return build_image_dataset(tmp_path_factory.mktemp("data"), num_classes=3, per_class=8, val_per_class=5)


def eval_args(encoder: Path, dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(encoder), "--dataset_name", str(dataset), "--load_from_disk", "True",
        "--output_dir", str(output_dir), *COMMON, "--seed", "0", "--per_device_eval_batch_size", "4", "--crop_pct", "1.0", *extra,
    ]  # fmt: skip


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "eval_results.json").read_text())


def run(script: Path, argv: list[str], processes: int = 1) -> None:
    """`script` under torchrun with `processes` processes (gloo; one: plain python)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run([*launcher, str(script), *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def same_metrics(two: dict, one: dict) -> None:
    """Top-1 / top-5 and the best head equal, losses to float rounding (sums in another order)."""
    assert two.keys() == one.keys()
    for key, value in one.items():
        if key.endswith("_loss"):
            assert two[key] == pytest.approx(value, abs=1e-4), key
        elif key.endswith(("_accuracy", "_top5", "best_head")):
            assert two[key] == value, key


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, encoder_dir, dataset_dir) -> Path:
    """The k-NN and linear protocols run by 2 processes: the k-NN with 23 training images (shards of 12 and 11) and
    15 queries (8 and 7 per process, in chunks of 4); the linear probe at batch 4 per process."""
    root = tmp_path_factory.mktemp("two_processes")
    script = root / "knn_then_linear.py"
    script.write_text(KNN_THEN_LINEAR)
    knn = eval_args(encoder_dir, dataset_dir, root / "knn", *KNN_FLAGS)
    linear = eval_args(encoder_dir, dataset_dir, root / "linear", *LINEAR_FLAGS, "--per_device_train_batch_size", "4")
    run(script, [*knn, "--", *linear, "--ddp_find_unused_parameters", "False"], processes=2)
    return root


def test_two_processes_give_the_knn_metrics_of_one_and_each_keeps_its_shard(tmp_path, encoder_dir, dataset_dir, two_processes, monkeypatch):
    """Each process keeps a bank of its shard (12 and 11 rows of the 23), and scoring every process's queries against
    every shard gives the one-process metrics, for every k of the pass."""
    banks = [json.loads((two_processes / "knn" / f"bank_{rank}.json").read_text()) for rank in (0, 1)]
    assert banks == [{"rows": 12, "split": 23, "processes": 2}, {"rows": 11, "split": 23, "processes": 2}]
    built, build = [], KnnBank.build.__func__
    monkeypatch.setattr(KnnBank, "build", classmethod(lambda cls, *args: built.append(build(cls, *args)) or built[-1]))
    one = eval_script.main(eval_args(encoder_dir, dataset_dir, tmp_path / "knn", *KNN_FLAGS))
    assert [bank.features.shape[0] for bank in built] == [23]
    two = results(two_processes / "knn")
    same_metrics(two, results(tmp_path / "knn"))
    assert one["eval_samples"] == two["eval_samples"] == 15  # each query once, the padding dropped
    assert one["eval_accuracy"] == one["eval_knn20_accuracy"]  # the first k is the headline
    assert {"eval_knn5_accuracy", "eval_knn5_top5", "eval_knn5_loss"} <= set(one)


def test_two_processes_give_the_linear_probe_metrics_of_one(tmp_path, encoder_dir, dataset_dir, two_processes):
    """Batch 8 on one process against 4 + 4 on two: the same images per step (one permutation dealt out in slices),
    the same crops (per-image seeds), DDP's averaged gradient; every head's metrics agree, and the best head too."""
    eval_script.main(eval_args(encoder_dir, dataset_dir, tmp_path / "linear", *LINEAR_FLAGS, "--per_device_train_batch_size", "8"))
    one, two = results(tmp_path / "linear"), results(two_processes / "linear")
    same_metrics(two, one)
    assert len([key for key in one if key.endswith("_lr1_accuracy")]) == 3  # mean, cls, last4


def test_each_head_of_a_grid_trains_as_if_alone(tmp_path, encoder_dir, dataset_dir):
    """Adding heads at other learning rates changes nothing for a head: its loss is its own, and gradient clipping
    is per head (clipping all heads' norm together would not pass)."""
    common = ["--protocol", "linear", "--linear_features", "last4", "--num_train_epochs", "2", "--max_grad_norm", "0.05",
              "--per_device_train_batch_size", "8", "--save_strategy", "steps", "--save_steps", "6"]  # fmt: skip
    alone = eval_script.main(eval_args(encoder_dir, dataset_dir, tmp_path / "alone", *common, "--probe_lrs", "0.1"))
    grid = eval_script.main(eval_args(encoder_dir, dataset_dir, tmp_path / "grid", *common, "--probe_lrs", "0.1", "3.0"))
    assert grid["eval_last4_lr0.1_loss"] == pytest.approx(alone["eval_last4_lr0.1_loss"], abs=1e-6)
    weights = {name: load_file(tmp_path / name / "checkpoint-6" / "model.safetensors") for name in ("alone", "grid")}
    head_0 = [key for key in weights["alone"] if key.startswith("heads.0.")]  # norm statistics, weight and bias
    assert len(head_0) == 4
    for key in head_0:
        torch.testing.assert_close(weights["grid"][key], weights["alone"][key], rtol=0, atol=1e-7)
    assert not torch.allclose(weights["grid"]["heads.1.1.weight"], weights["grid"]["heads.0.1.weight"])


def test_killed_attentive_probe_resumes_from_its_checkpoint(tmp_path, encoder_dir, dataset_dir):
    """SIGKILL after the first complete checkpoint, the same command again: it resumes (heads, BatchNorm statistics,
    AdamW, schedule, data position) and ends with the uninterrupted run's weights, log and metrics."""
    flags = ["--protocol", "attentive", "--attentive_blocks", "2", "--probe_lrs", "1e-3", "1e-2", "--optim", "adamw_torch",
             "--weight_decay", "0.05", "--max_grad_norm", "3.0", "--warmup_steps", "2", "--probe_min_lr", "1e-5",
             "--num_train_epochs", "3", "--per_device_train_batch_size", "8", "--save_steps", "3", "--logging_steps", "1"]  # fmt: skip
    eval_script.main(eval_args(encoder_dir, dataset_dir, tmp_path / "uninterrupted", *flags))

    output_dir = tmp_path / "killed"
    command = [sys.executable, str(REPO / "eval.py"), *eval_args(encoder_dir, dataset_dir, output_dir, *flags)]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        while not list(output_dir.glob(f"checkpoint-*/{CHECKPOINT_COMPLETE}")):
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    assert not (output_dir / "eval_results.json").exists(), "the probe finished before it was killed"
    eval_script.main(eval_args(encoder_dir, dataset_dir, output_dir, *flags))

    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    reference_history = json.loads((tmp_path / "uninterrupted" / "trainer_state.json").read_text())["log_history"]
    losses = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    assert losses == pytest.approx({entry["step"]: entry["loss"] for entry in reference_history if "loss" in entry}, abs=1e-5)
    assert sorted(losses) == list(range(1, 10))  # 3 epochs of 3 steps
    final = "checkpoint-9/model.safetensors"
    for name, tensor in load_file(tmp_path / "uninterrupted" / final).items():
        torch.testing.assert_close(load_file(output_dir / final)[name], tensor, rtol=0, atol=1e-5, msg=name)
    same_metrics(results(output_dir), results(tmp_path / "uninterrupted"))


def test_attention_mode_is_chosen_per_call(encoder_dir):
    """Causal attention, as NEPA pretrains: the CLS token (first in the sequence) sees only itself, so it is the same
    for every image; bidirectional, it depends on the image. The mean patch token depends on it in both."""
    images = torch.randn(2, 3, 16, 16)
    for is_causal in (True, False):
        encoder = load_frozen_encoder(str(encoder_dir), is_causal)
        assert encoder.config.is_causal is is_causal and not any(p.requires_grad for p in encoder.parameters())
        with torch.no_grad():
            features = pooled_features(encoder, images, ("mean", "cls", "last4"))
        assert features["last4"].shape == (2, 4 * encoder.config.hidden_size)
        assert not torch.allclose(features["mean"][0], features["mean"][1])
        assert torch.allclose(features["cls"][0], features["cls"][1], atol=1e-6) is is_causal


def test_probe_flags_are_refused_where_they_do_not_apply(tmp_path, encoder_dir, dataset_dir):
    cases = [
        (["--protocol", "finetuned", "--is_causal", "False"], "--is_causal is used only by the frozen protocols"),
        (["--protocol", "knn", "--probe_lrs", "0.1"], r"--probe_lrs is used only by the trained probes \(--protocol linear / attentive\)"),
        (["--protocol", "linear", "--learning_rate", "0.1"], "--learning_rate is not used: the probes train a grid"),
        (["--protocol", "linear", "--aa", "rand-m9"], "--aa is the attentive probe's augmentation"),
        (["--protocol", "knn", "--crop_scale", "0.5", "1"], "--crop_scale is used only by the trained probes"),
        (["--protocol", "attentive"], r"--attentive_blocks 6 asks for blocks -1..4, but the encoder has blocks 1..4"),
        (["--protocol", "linear", "--linear_features", "mean", "max"], r"--linear_features \['mean', 'max'\]: choose among"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            eval_script.main(eval_args(encoder_dir, dataset_dir, tmp_path / "refused", *flags))


def test_help_explains_every_protocol(capsys):
    with pytest.raises(SystemExit):
        eval_script.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("finetuned: the classifier's predictions", "knn: weighted k-NN", "linear: a grid of linear heads",
                   "attentive: AIM's attentive probe", "--is_causal", "--attentive_blocks", "--probe_lrs"):  # fmt: skip
        assert phrase in text, phrase


@pytest.mark.parametrize("size, name", [("b", "base"), ("l", "large")])
@pytest.mark.parametrize("protocol", ["knn", "linear", "attentive"])
def test_frozen_eval_scripts_launch_their_recipe(tmp_path, size, name, protocol):
    """The command a script launches on one GPU, recorded by a stand-in for Python, parses and carries the recipe;
    without the encoder folder the script says which `hf download` to run."""
    stand_in, record = tmp_path / "python", tmp_path / "argv"
    stand_in.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\nprintf "%s\\n" "$@" > {record}\n')
    stand_in.chmod(0o755)
    script = REPO / "scripts/eval" / f"nepa_{size}_{protocol}.sh"
    env = {**ENV, "PYTHON": str(stand_in), "NPROC_PER_NODE": "1", "REPORT_TO": "none", "MODEL": str(tmp_path / "missing")}
    missing = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and f"hf download SixAILab/nepa-{name}-patch14-224 --local-dir" in missing.stderr
    (tmp_path / "encoder").mkdir()
    result = subprocess.run(["bash", str(script), "--use_cpu", "True"], env={**env, "MODEL": str(tmp_path / "encoder")}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    assert argv[0] == "eval.py"
    args, data_args, training_args = eval_script.parse_arguments(
        (eval_script.EvalArguments, eval_script.DataArguments, eval_script.EvalTrainingArguments), argv[1:], eval_script.FLAG_USES
    )
    assert args.protocol == protocol and args.is_causal is not False and training_args.bf16
    assert args.crop_pct == (0.875 if size == "b" else 0.95)
    if protocol == "knn":
        assert args.knn_k == [10, 20, 100, 200] and args.knn_temperature == 0.07
        return
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 1024
    assert training_args.lr_scheduler_type == "cosine" and training_args.save_steps == 1000
    if protocol == "linear":
        assert training_args.num_train_epochs == 10 and training_args.max_grad_norm == 0
    else:
        assert training_args.num_train_epochs == 100 and training_args.warmup_steps == 0.05
        assert training_args.optim == "adamw_torch_fused" and (training_args.adam_beta1, training_args.adam_beta2) == (0.9, 0.999)
        assert training_args.weight_decay == 0.05 and training_args.max_grad_norm == 3.0 and args.probe_min_lr == 1e-5
        assert args.attentive_blocks == [6] and args.aa == "rand-m9-mstd0.5-inc1" and list(data_args.crop_scale) == [0.08, 1.0]
