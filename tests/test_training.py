"""Behaviour of the training and evaluation scripts: pretraining, resuming, conversion to a
classifier, fine-tuning with the paper's recipe, evaluation protocols, and the pieces they are built from
(parameter groups, schedule, EMA, mixup, metrics). Tiny 16 px models on generated images, CPU, in-process
through each script's `main(argv)`; one pretraining run is shared by the session."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    COMMON,
    IMAGE_SIZE,
    build_image_dataset,
    build_reference_dataset,
    recipe_command,
    save_processor,
    tiny_config,
    write_config_folder,
)
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import EvalPrediction

import eval as eval_script
import init_nepa_cls_from_pretrain
import train_finetune
import train_pretrain
from models.vit_nepa import ViTNepaForImageClassification, ViTNepaForPreTraining
from nepa.args import DataArguments, NepaTrainingArguments, parse_arguments
from nepa.data import BatchNormalize
from nepa.ema import ModelEMA
from nepa.metrics import accuracy_metrics, top5_and_nll, top5_indices
from nepa.optim import group_warmup_steps, layer_decay_cosine_schedule, layer_decay_param_groups

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
RUN = [*COMMON, "--seed", "0"]  # every run of this file is seeded 0
EVAL_KEYS = {"eval_accuracy", "eval_top5", "eval_loss"}
EMA_EVAL_KEYS = {"eval_ema_accuracy", "eval_ema_top5", "eval_ema_loss"}


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """3 classes of noisy single-colour 40x32 JPEGs: 24 training and 12 validation images."""
    return build_image_dataset(tmp_path_factory.mktemp("data"), num_classes=NUM_CLASSES, per_class=8, val_per_class=4)


@pytest.fixture(scope="session")
def config_dir(tmp_path_factory) -> Path:
    return write_config_folder(tmp_path_factory.mktemp("config"))


def pretrain_argv(config_dir, dataset_dir, output_dir, *extra) -> list[str]:
    return [
        "--config_name", str(config_dir),
        "--dataset_name", str(dataset_dir),
        "--load_from_disk", "True",
        "--output_dir", str(output_dir),
        "--do_train",
        "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-3",
        "--weight_decay", "0.05",
        *RUN,
        *extra,
    ]  # fmt: skip


def finetune_argv(model_dir, dataset_dir, output_dir, *extra) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir),
        "--dataset_name", str(dataset_dir),
        "--load_from_disk", "True",
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16",
        "--learning_rate", "1e-3",
        *RUN,
        *extra,
    ]  # fmt: skip


def eval_argv(model_dir, dataset_dir, output_dir, *extra) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir),
        "--dataset_name", str(dataset_dir),
        "--load_from_disk", "True",
        "--output_dir", str(output_dir),
        "--per_device_eval_batch_size", "16",
        *RUN,
        *extra,
    ]  # fmt: skip


def convert(pretrained_dir, local_dir, *extra) -> Path:
    argv = ["--pretrained_model_id", str(pretrained_dir), "--save_local", "--local_dir", str(local_dir), *extra]
    init_nepa_cls_from_pretrain.main(argv)
    return Path(local_dir)


def log_history(output_dir) -> list[dict]:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="session")
def pretraining_run(tmp_path_factory, config_dir, dataset_dir) -> tuple[Path, dict]:
    """40 steps of NEPA pretraining, logged every 5 steps, then evaluated; (output_dir, returned metrics)."""
    output_dir = tmp_path_factory.mktemp("pretrained")
    schedule = ["--max_steps", "40", "--warmup_steps", "5", "--logging_steps", "5", "--save_strategy", "no", "--do_eval"]
    metrics = train_pretrain.main(pretrain_argv(config_dir, dataset_dir, output_dir, *schedule))
    return output_dir, metrics


@pytest.fixture(scope="session")
def pretrained_dir(pretraining_run) -> Path:
    return pretraining_run[0]


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory, pretrained_dir, dataset_dir) -> Path:
    """The pretrained encoder as a bidirectional classifier with the dataset's class names."""
    return convert(pretrained_dir, tmp_path_factory.mktemp("classifier") / "cls", "--dataset_name", str(dataset_dir))


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------


def test_pretraining_loss_falls_and_the_model_is_saved(pretraining_run):
    output_dir, metrics = pretraining_run
    logs = [entry for entry in log_history(output_dir) if "loss" in entry]
    assert [entry["step"] for entry in logs] == list(range(5, 41, 5))
    losses = [entry["loss"] for entry in logs]
    assert all(-1.0 <= loss <= 1.0 for loss in losses)  # a negative cosine
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.01, losses
    # The collapse signal and the throughput since the previous line are logged beside every loss.
    assert all(-1.0 <= entry["target_cosine"] <= 1.0 for entry in logs)
    assert all(entry["images_per_second"] > 0 for entry in logs)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (output_dir / name).is_file(), name
    assert metrics["train_loss"] == pytest.approx(np.mean([entry["loss"] for entry in logs]), abs=1e-3)
    reloaded = ViTNepaForPreTraining.from_pretrained(output_dir)
    assert reloaded.config.image_size == IMAGE_SIZE and reloaded.config.is_causal
    # Evaluation: the NEPA loss on the validation split, of the weights and of their EMA.
    assert -1.0 <= metrics["eval_loss"] <= 1.0 and -1.0 <= metrics["eval_ema_loss"] <= 1.0


def test_arguments_from_a_json_file(tmp_path, config_dir, dataset_dir):
    arguments = {
        "config_name": str(config_dir),
        "dataset_name": str(dataset_dir),
        "load_from_disk": True,
        "output_dir": str(tmp_path / "run"),
        "do_train": True,
        "max_steps": 2,
        "logging_steps": 1,
        "per_device_train_batch_size": 4,
        "use_cpu": True,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    (tmp_path / "args.json").write_text(json.dumps(arguments))
    train_pretrain.main([str(tmp_path / "args.json")])
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 4
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_every_process_shuffles_with_the_same_data_seed():
    """The processes' random streams differ, but the data sampler must not: it is seeded with --seed unless
    --data_seed is given (the two-process curve test in test_reliability.py runs it end to end)."""
    (args,) = parse_arguments((NepaTrainingArguments,), ["--output_dir", "unused", "--seed", "7"])
    assert args.data_seed == 7
    (args,) = parse_arguments((NepaTrainingArguments,), ["--output_dir", "unused", "--seed", "7", "--data_seed", "3"])
    assert args.data_seed == 3


def draws_after_trainer_init(output_dir: Path, seed: int, rank: int, monkeypatch) -> tuple[float, float, float]:
    """The first `random`, numpy and torch numbers process `rank` draws once a NepaTrainer has been built."""
    import random

    from nepa.trainer import NepaTrainer

    with monkeypatch.context() as patched:
        patched.setattr(NepaTrainingArguments, "process_index", property(lambda self: rank))
        (args,) = parse_arguments((NepaTrainingArguments,), ["--output_dir", str(output_dir), *COMMON, "--seed", str(seed)])
        NepaTrainer(model=ViTNepaForPreTraining(tiny_config()), args=args, normalize=BatchNormalize([0.5] * 3, [0.5] * 3))
        return random.random(), float(np.random.rand()), torch.rand(()).item()


def test_every_rank_of_every_seed_draws_its_own_stream(tmp_path, monkeypatch):
    """Process 0 draws what set_seed(seed) gives (one-process runs are unchanged); rank 1 of seed 7 shares no stream
    with rank 0 of seed 8, nor with rank 0 or 2 of seed 7."""
    import random

    from transformers import set_seed

    set_seed(7)
    expected = random.random(), float(np.random.rand()), torch.rand(()).item()
    assert draws_after_trainer_init(tmp_path, 7, 0, monkeypatch) == expected
    rank_1 = draws_after_trainer_init(tmp_path, 7, 1, monkeypatch)
    for other in ((8, 0), (7, 0), (7, 2), (6, 2)):
        others = draws_after_trainer_init(tmp_path, *other, monkeypatch)
        assert all(a != b for a, b in zip(rank_1, others)), other


def test_trainers_override_public_trainer_methods_that_the_trainer_calls(tmp_path, monkeypatch, config_dir, dataset_dir, classifier_dir):
    """The trainers override no private `Trainer` method (an upgrade may rename those) but `_save_checkpoint`, the
    one place where every process writes its part of a checkpoint (a failed write must stop every process), and the
    Trainer calls every method and callback hook they override: a pretraining run with logging, evaluation and a
    checkpoint, and a fine-tuning run, call each one. A transformers upgrade that stops calling one (so that
    normalisation, the EMA, the checkpoint marker, the write-failure check or the non-finite guard would be bypassed
    silently) fails here."""
    from transformers import Trainer

    from nepa.nonfinite import NonFiniteLossGuard
    from nepa.probes import ProbeTrainer
    from nepa.segmentation import SegmentationTrainer
    from nepa.trainer import CheckpointCompletion, DatasetEpoch, EmaUpdate, NepaTrainer, ThroughputClock

    trainers = (NepaTrainer, train_pretrain.NepaPretrainer, train_finetune.FinetuneTrainer)
    for trainer_class in (*trainers, ProbeTrainer, SegmentationTrainer):
        private = [name for name in vars(trainer_class) if name.startswith("_") and not name.startswith("__")]
        allowed = ["_save_checkpoint"] if trainer_class is NepaTrainer else []
        assert private == allowed, f"{trainer_class.__name__} overrides private Trainer methods {private}"

    called = set()

    def recording(owner, name, method):
        def wrapper(*args, **kwargs):
            called.add((owner.__name__, name))
            return method(*args, **kwargs)

        return wrapper

    overrides = [(cls, name) for cls in trainers for name in vars(cls) if not name.startswith("_") and hasattr(Trainer, name)]
    overrides += [(NepaTrainer, "_save_checkpoint")]
    overrides += [(cls, name) for cls in (NonFiniteLossGuard, ThroughputClock, EmaUpdate, DatasetEpoch, CheckpointCompletion) for name in vars(cls) if name.startswith("on_")]
    for cls, name in overrides:
        monkeypatch.setattr(cls, name, recording(cls, name, vars(cls)[name]))
    schedule = ["--max_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--do_eval"]
    train_pretrain.main(pretrain_argv(config_dir, dataset_dir, tmp_path / "pretrained", *schedule))
    finetune_schedule = ["--do_train", "--max_steps", "1", "--save_strategy", "no"]
    train_finetune.main(finetune_argv(classifier_dir, dataset_dir, tmp_path / "finetuned", *finetune_schedule))
    assert len(overrides) > 10
    assert sorted(called) == sorted((cls.__name__, name) for cls, name in overrides)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned host copy exists on a GPU only")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_training_step_never_reads_a_tensor_on_the_host(tmp_path, monkeypatch, device):
    """A micro-step only counts non-finite losses on the device: the CPU must not wait for the GPU there. With a
    fused optimiser (the default) the guard reads each optimiser step's flag only after that step, never while
    the step waits for it; on a GPU the flag reaches the host through a pinned copy and an event."""
    from nepa.data import collate_images
    from nepa.nonfinite import NonFiniteLossGuard
    from nepa.trainer import NepaTrainer

    reads, settle = [], NonFiniteLossGuard.settle

    def recording_settle(self, args):
        if self.pending is not None:
            step, flag = self.pending
            reads.append((step, self.trainer.state.global_step))  # (flag's step, steps completed)
            if device == "cuda":
                assert flag.host.is_pinned() and flag.ready is not None
        return settle(self, args)

    monkeypatch.setattr(NonFiniteLossGuard, "settle", recording_settle)

    def host_read(*_):
        raise AssertionError("training_step read a tensor on the host")

    def checked_training_step(self, *args, **kwargs):
        with monkeypatch.context() as patched:
            for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
                patched.setattr(torch.Tensor, method, host_read)
            return NepaTrainer.training_step(self, *args, **kwargs)

    flags = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    common = RUN if device == "cpu" else [flag for flag in RUN if flag != "--use_cpu"]
    (args,) = parse_arguments((NepaTrainingArguments,), ["--output_dir", str(tmp_path), *common, *flags, "--save_strategy", "no"])
    assert args.device.type == device
    images = [{"pixel_values": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)} for _ in range(8)]
    trainer_class = type("CheckedTrainer", (NepaTrainer,), {"training_step": checked_training_step})
    trainer = trainer_class(
        model=ViTNepaForPreTraining(tiny_config()), args=args, train_dataset=images, data_collator=collate_images,
        normalize=BatchNormalize([0.5] * 3, [0.5] * 3),
    )
    assert trainer.train().global_step == 2
    assert args.optim == "adamw_torch_fused"
    assert [step for step, _ in reads] == [1, 2] and all(completed >= step for step, completed in reads)


@CUDA
def test_host_copy_of_a_gpu_scalar_waits_for_its_own_point_of_the_stream():
    """`HostCopy` returns at once while the GPU is busy (its copy is queued behind the work), and `item()` then
    gives the value computed at that point, not one written later in the stream."""
    from nepa.nonfinite import HostCopy

    value = torch.zeros((), device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # keeps the stream busy for about a second
    value += 1
    copy = HostCopy(value)
    assert copy.host.is_pinned() and not copy.ready.query()  # queued, not waited for
    value += 1  # queued after the copy: not what the copy sees
    assert copy.item() == 1.0
    torch.cuda.synchronize()
    assert value.item() == 2.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_fused_adamw_skips_its_update_when_found_inf_is_set(device):
    """The guard skips a flagged step of a fused optimiser by setting `found_inf`, an attribute torch does not document
    (checked on torch 2.14.1): set to 1, fused AdamW leaves the weights, its moments and its step count as they were;
    set to 0 or removed, it steps. A torch upgrade that stops honouring it fails here."""
    from nepa.nonfinite import fused_optimizer

    weight = torch.nn.Parameter(torch.ones(3, device=device))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    assert fused_optimizer(optimizer) is optimizer and fused_optimizer(torch.optim.AdamW([weight])) is None
    weight.grad = torch.ones(3, device=device)
    optimizer.found_inf = torch.tensor(1.0, device=device)
    optimizer.step()
    state = optimizer.state[weight]
    assert (weight.detach() == 1).all() and state["step"].item() == 0 and not state["exp_avg"].any()
    optimizer.found_inf = torch.tensor(0.0, device=device)
    optimizer.step()
    assert state["step"].item() == 1 and (weight.detach() < 1).all()
    del optimizer.found_inf
    optimizer.step()
    assert state["step"].item() == 2


def test_pretraining_parameter_groups(tmp_path):
    torch.manual_seed(0)
    model = ViTNepaForPreTraining(tiny_config(layerscale_value=1e-5, qk_norm_affine=True))
    args = NepaTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=1e-3, weight_decay=0.05
    )
    normalize = BatchNormalize([0.5] * 3, [0.5] * 3)
    trainer = train_pretrain.NepaPretrainer(model=model, args=args, normalize=normalize, embed_lr=2e-4)
    optimizer = trainer.create_optimizer()

    names = {id(param): name for name, param in model.named_parameters()}
    placed = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            placed.setdefault(names[id(param)], []).append(group)
    assert sorted(placed) == sorted(names.values()) and all(len(groups) == 1 for groups in placed.values())
    for name, (group,) in placed.items():
        no_decay = name.endswith(("bias", "lambda1", "cls_token")) or "norm" in name
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
        assert group["lr"] == (2e-4 if ".embeddings." in name else 1e-3), name
    assert {"vit_nepa.embeddings.cls_token", "vit_nepa.embeddings.patch_embeddings.projection.weight"} <= set(placed)


# --------------------------------------------------------------------------------------------
# Conversion, fine-tuning and evaluation
# --------------------------------------------------------------------------------------------


def test_conversion_copies_the_backbone_and_reports_the_new_tensors(tmp_path, capsys, pretrained_dir, dataset_dir):
    target = write_config_folder(tmp_path / "sft-config", is_causal=False, add_pooling_layer=True, qk_norm_affine=True)
    local_dir = convert(
        pretrained_dir, tmp_path / "cls", "--config_model_id", str(target), "--dataset_name", str(dataset_dir)
    )

    new_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("new ("))
    query_key_norms = {
        f"vit_nepa.encoder.layer.{i}.attention.attention.{norm}.weight"
        for i in range(2)
        for norm in ("q_norm", "k_norm")
    }
    expected_new = {"fc_norm.weight", "fc_norm.bias", "classifier.weight", "classifier.bias"} | query_key_norms
    assert set(new_line.split(": ", 1)[1].split(", ")) == expected_new

    pretrained = load_file(pretrained_dir / "model.safetensors")
    converted = load_file(local_dir / "model.safetensors")
    assert set(converted) == set(pretrained) | expected_new
    for key, tensor in pretrained.items():
        torch.testing.assert_close(converted[key], tensor, rtol=0, atol=0, msg=key)
    assert not converted["classifier.weight"].any() and not converted["classifier.bias"].any()
    for key in query_key_norms | {"fc_norm.weight"}:
        assert torch.equal(converted[key], torch.ones_like(converted[key])), key
    model = ViTNepaForImageClassification.from_pretrained(local_dir)
    assert not model.config.is_causal
    assert [model.config.id2label[i] for i in range(NUM_CLASSES)] == ["class_0", "class_1", "class_2"]
    assert (local_dir / "preprocessor_config.json").is_file()


def test_folding_layerscale_keeps_the_encoder_function(tmp_path, pretrained_dir):
    # Lambdas far from 1 and from each other, so that a wrong fold shows.
    pretrained = ViTNepaForPreTraining.from_pretrained(pretrained_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pretrained.named_parameters():
            if name.endswith("lambda1"):
                param.copy_(torch.empty(param.shape).uniform_(0.2, 2.0, generator=generator))
    pretrained.save_pretrained(tmp_path / "pretrained")
    save_processor(tmp_path / "pretrained")

    local_dir = convert(tmp_path / "pretrained", tmp_path / "cls", "--disable_layerscale")
    assert not any("lambda1" in key for key in load_file(local_dir / "model.safetensors"))
    # The classifier is bidirectional; with the pretraining attention back, the encoder must be the same function.
    folded = ViTNepaForImageClassification.from_pretrained(local_dir, is_causal=True).eval()
    assert folded.config.layerscale_value is None
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    with torch.no_grad():
        expected = pretrained.vit_nepa(pixels).last_hidden_state
        actual = folded.vit_nepa(pixels).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_finetune_with_the_releases_flags_keeps_an_ema_then_eval(tmp_path, classifier_dir, dataset_dir):
    """The release's fine-tuning flags, which leave the EMA to its default (on), give eval_ema_* beside eval_*."""
    output_dir = tmp_path / "sft"
    release = ["--freeze_vit", "False", "--freeze_embed", "True", "--warmup_ratio", "0.2", "--llrd", "0.65"]
    release += ["--lr_scheduler_kwargs", '{"custom_scheduler_type": "llrd_cosine_warmup"}', "--ema_decay", "0.9"]
    extra = ["--do_train", "--do_eval", "--max_steps", "4", "--save_strategy", "no", *release]
    metrics = train_finetune.main(finetune_argv(classifier_dir, dataset_dir, output_dir, *extra))
    assert EVAL_KEYS | EMA_EVAL_KEYS <= set(metrics)
    assert (output_dir / "model_ema.safetensors").is_file() and (output_dir / "model.safetensors").is_file()
    assert set(load_file(output_dir / "model_ema.safetensors")) == set(load_file(output_dir / "model.safetensors"))

    results = eval_script.main(eval_argv(output_dir, dataset_dir, tmp_path / "eval"))
    written = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert EVAL_KEYS | EMA_EVAL_KEYS <= set(written)
    assert written == pytest.approx(results)
    # The same weights, data and eval transform as the fine-tuning run's own evaluation: the same numbers.
    for key in EVAL_KEYS | EMA_EVAL_KEYS:
        assert written[key] == pytest.approx(metrics[key], abs=1e-5), key


@pytest.mark.parametrize("protocol", ["knn", "linear", "attentive"])
def test_frozen_feature_protocols_on_a_pretraining_folder(tmp_path, protocol, pretrained_dir, dataset_dir):
    two_blocks = {"linear": ["--linear_features", "mean", "cls"], "attentive": ["--attentive_blocks", "2"]}  # not last4 / 6
    extra = {"knn": [], **{name: ["--num_train_epochs", "2", *flags] for name, flags in two_blocks.items()}}
    results = eval_script.main(eval_argv(pretrained_dir, dataset_dir, tmp_path / "eval", "--protocol", protocol, *extra[protocol]))
    written = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert EVAL_KEYS <= set(written) and written == {key: pytest.approx(value) for key, value in results.items()}
    assert 0.0 <= written["eval_accuracy"] <= written["eval_top5"] == 1.0  # 3 classes: top-5 holds them all
    assert written["eval_attention"] == "causal"
    if protocol != "knn":  # every head is reported, and the best one is the headline
        heads = [key[len("eval_") : -len("_accuracy")] for key in written if key.endswith("_accuracy") and key != "eval_accuracy"]
        assert len(heads) == (2 * 8 if protocol == "linear" else 7)
        assert written["eval_accuracy"] == max(written[f"eval_{head}_accuracy"] for head in heads)
        assert written["eval_accuracy"] == written[f"eval_{written['eval_best_head']}_accuracy"]
        table = (tmp_path / "eval" / "probe_heads.md").read_text().splitlines()
        assert len(table) == 2 + len(heads) and table[2].startswith(f"| {written['eval_best_head']} |")


def test_conversion_rejects_a_config_of_another_width(tmp_path, pretrained_dir):
    target = write_config_folder(tmp_path / "wide", hidden_size=64, is_causal=False)
    with pytest.raises(SystemExit, match=r"hidden_size: pretrained 32 vs target 64"):
        convert(pretrained_dir, tmp_path / "cls", "--config_model_id", str(target))
    assert not (tmp_path / "cls").exists()
    # Below main(), a function raises the exception; only main() turns it into an exit status.
    args = init_nepa_cls_from_pretrain.parse_args(["--pretrained_model_id", str(pretrained_dir), "--config_model_id", str(target), "--save_local"])
    with pytest.raises(ValueError, match=r"hidden_size: pretrained 32 vs target 64"):
        init_nepa_cls_from_pretrain.convert(args)


@pytest.mark.parametrize(
    "field, value",
    [("qk_norm", False), ("hidden_act", "silu"), ("layer_norm_eps", 1e-6), ("rope_theta", 10000.0), ("image_size", 32),
     ("layerscale_value", None), ("qkv_bias", False)],
)  # fmt: skip
def test_conversion_refuses_a_config_that_changes_the_function(tmp_path, pretrained_dir, field, value):
    """Only the fields meant to change (attention direction, pooling, regularisation, labels, QK-norm gaining
    affine weights) may differ from the encoder's; any other is refused by name, and nothing is written."""
    target = write_config_folder(tmp_path / "target", is_causal=False, add_pooling_layer=True, qk_norm_affine=True, **{field: value})
    with pytest.raises(SystemExit, match=rf"{field}: pretrained \S+ vs target"):
        convert(pretrained_dir, tmp_path / "cls", "--config_model_id", str(target))
    assert not (tmp_path / "cls").exists()


def test_argparse_scripts_spell_booleans_as_the_training_scripts_do(capsys):
    """`--flag True` / `--flag False` everywhere; the bare `--flag` of the release's converter still means True."""
    import download_dataset

    base = ["--pretrained_model_id", "unused"]
    for spelling, expected in (([], False), (["--use_ema"], True), (["--use_ema", "True"], True), (["--use_ema", "False"], False)):
        args = init_nepa_cls_from_pretrain.parse_args([*base, "--save_local", "True", *spelling])
        assert (args.use_ema, args.save_local) == (expected, True)
    assert download_dataset.parse_args(["--overwrite", "true"]).overwrite
    assert not download_dataset.parse_args(["--overwrite", "False"]).overwrite
    with pytest.raises(SystemExit):
        init_nepa_cls_from_pretrain.parse_args([*base, "--save_local", "maybe"])
    with pytest.raises(SystemExit):
        parse_arguments((eval_script.EvalArguments,), ["--model_name_or_path", "unused", "--protocol", "knm"])
    assert "invalid choice: 'knm' (choose from 'finetuned', 'knn', 'linear', 'attentive')" in capsys.readouterr().err


def test_finetuning_config_comes_from_the_folder_and_flags_apply_only_when_given(tmp_path):
    """The classifier folder's drop_path_prob / is_causal run unless --config_overrides or its spellings
    --drop_path / --is_causal change them; the two ways disagreeing is an error."""
    folder = tmp_path / "cls"
    ViTNepaForImageClassification(tiny_config(add_pooling_layer=True, is_causal=False, drop_path_prob=0.3)).save_pretrained(folder)

    def loaded(**flags):
        return train_finetune.load_classifier(train_finetune.FinetuneArguments(model_name_or_path=str(folder), **flags)).config

    assert (loaded().drop_path_prob, loaded().is_causal) == (0.3, False)
    assert loaded(drop_path=0.0).drop_path_prob == 0.0
    assert loaded(is_causal=True).is_causal
    changed = loaded(config_overrides="is_causal=true,drop_path_prob=0.2,pos_embed_rescale=null")
    assert (changed.is_causal, changed.drop_path_prob, changed.pos_embed_rescale) == (True, 0.2, None)
    with pytest.raises(ValueError, match="sets drop_path_prob=0.2 and a flag sets it to 0.1"):
        loaded(config_overrides="drop_path_prob=0.2", drop_path=0.1)
    with pytest.raises(ValueError, match="ViTNepaConfig has no field 'drop_path'"):
        loaded(config_overrides="drop_path=0.2")


def test_eval_of_the_reference_fixture_agrees_with_its_expected_logits(tmp_path, reference_fixture_dir):
    model_dir = tmp_path / "reference"
    shutil.copytree(reference_fixture_dir, model_dir)
    save_processor(model_dir, size=56)
    dataset = build_reference_dataset(reference_fixture_dir, tmp_path / "dataset")
    results = eval_script.main(eval_argv(model_dir, dataset, tmp_path / "eval", "--resize_size", "56"))
    assert results["eval_accuracy"] == 1.0 and results["eval_top5"] == 1.0
    assert not EMA_EVAL_KEYS & set(results)  # the fixture folder has no EMA weights


# --------------------------------------------------------------------------------------------
# Layer-wise lr decay and its schedule
# --------------------------------------------------------------------------------------------

LAYERS, LR, DECAY, HEAD_LR = 2, 1e-3, 0.6, 5e-3


def tiny_classifier() -> ViTNepaForImageClassification:
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=LAYERS, add_pooling_layer=True, num_labels=NUM_CLASSES)
    return ViTNepaForImageClassification(config)


# Worked out by hand for LAYERS = 2, LR = 1e-3, DECAY = 0.6, HEAD_LR = 5e-3, as the release groups them:
# the embeddings get LR * 0.6**2, layer 0 LR * 0.6, layer 1 LR, fc_norm LR (it is not in the head group),
# and the head group (classifier and the encoder's final LayerNorm) HEAD_LR.
HAND_WORKED_LR = {
    "vit_nepa.embeddings.": 3.6e-4,
    "vit_nepa.encoder.layer.0.": 6e-4,
    "vit_nepa.encoder.layer.1.": 1e-3,
    "fc_norm.": 1e-3,
    "vit_nepa.layernorm.": 5e-3,
    "classifier.": 5e-3,
}


def test_layer_decay_groups_have_the_releases_learning_rates():
    model = tiny_classifier()
    model.vit_nepa.embeddings.patch_embeddings.requires_grad_(False)  # --freeze_embed
    groups = layer_decay_param_groups(model, LR, weight_decay=0.05, layer_decay=DECAY, head_lr=HEAD_LR)

    names = {id(param): name for name, param in model.named_parameters()}
    placed = [(names[id(param)], param, group) for group in groups for param in group["params"]]
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert sorted(name for name, _, _ in placed) == sorted(trainable)  # each trainable tensor exactly once
    assert not any("patch_embeddings" in name for name, _, _ in placed)
    for name, param, group in placed:
        (prefix,) = [prefix for prefix in HAND_WORKED_LR if name.startswith(prefix)]
        assert group["lr"] == pytest.approx(HAND_WORKED_LR[prefix], rel=1e-12), name
        assert group["weight_decay"] == (0.0 if param.ndim == 1 or name.endswith("cls_token") else 0.05), name
    assert sorted({round(group["lr"], 12) for group in groups}) == pytest.approx([3.6e-4, 6e-4, 1e-3, 5e-3])


def test_schedule_warms_each_group_up_then_decays_by_half_cosine():
    warmup, total = 10, 50
    model = tiny_classifier()
    groups = layer_decay_param_groups(model, LR, weight_decay=0.05, layer_decay=DECAY, head_lr=HEAD_LR)
    optimizer = torch.optim.AdamW(groups, lr=LR)
    peaks = [group["lr"] for group in optimizer.param_groups]
    schedule = layer_decay_cosine_schedule(optimizer, warmup, total)
    lrs = []
    for _ in range(total + 1):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    lrs = np.array(lrs)  # (step, group)

    # warmup - round(warmup * min(factor, 1)), at least 1: head and last layer (factor 1) 1 step,
    # layer 0 (factor 0.6) 10 - 6 = 4 steps, embeddings (factor 0.36) 10 - 4 = 6 steps.
    by_layer = {0: 6, 1: 4, 2: 1, 3: 1}
    for column, group in enumerate(optimizer.param_groups):
        group_warmup = by_layer[group["layer"]]
        assert group_warmup_steps(warmup, group["lr_factor"]) == group_warmup
        peak = peaks[column]
        rise = lrs[: group_warmup + 1, column]
        np.testing.assert_allclose(rise, peak * np.arange(group_warmup + 1) / group_warmup, rtol=1e-9)
        for step in (group_warmup + 1, (group_warmup + total) // 2, total - 1):
            progress = (step - group_warmup) / (total - group_warmup)
            assert lrs[step, column] == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * progress)), rel=1e-9)
        assert lrs[total, column] == pytest.approx(0.0, abs=1e-12)
        assert np.all(np.diff(lrs[group_warmup:, column]) <= 1e-15)


# The paper's layer-decay ramp, as the release's command line selects it (its llrd_cosine schedule).
RELEASE_RAMP = ["--lr_scheduler_kwargs", '{"custom_scheduler_type": "llrd_cosine", "llrd_end": 1.0}']


def paper_ramp_lr(name: str, step: int, total: int, warmup: int, start: float = 0.35, end: float = 1.0) -> float:
    """The lr of tensor `name` at optimiser step `step` (0-based) of the ramp, written out from its description: the
    decay goes from `start` to `end` as start + (end - start) * (1 - cos(pi t / T)) / 2; a tensor runs at its base lr
    (HEAD_LR for the classifier and the final LayerNorm, LR for the rest) times decay ** scale (L-1-i in block i, L in
    the embeddings, 0 elsewhere) times one linear warm-up for all, then a half-cosine to 0."""
    if name.startswith(("classifier.", "vit_nepa.layernorm.")):
        base, scale = HEAD_LR, 0
    elif ".encoder.layer." in name:
        base, scale = LR, LAYERS - 1 - int(name.split(".encoder.layer.")[1].split(".")[0])
    elif ".embeddings." in name:
        base, scale = LR, LAYERS
    else:
        base, scale = LR, 0
    decay = start + (end - start) * (1 - math.cos(math.pi * step / total)) / 2
    shape = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return base * decay**scale * shape


@pytest.fixture
def optimiser_steps(monkeypatch) -> list[dict[str, float]]:
    """Every trainable tensor's lr, by name, before each optimiser step of the fine-tuning runs in a test."""
    steps, models = [], []
    load = train_finetune.load_classifier
    monkeypatch.setattr(train_finetune, "load_classifier", lambda args: models.append(load(args)) or models[-1])

    def record(optimizer, args, kwargs):
        if models:
            names = {id(param): name for name, param in models[-1].named_parameters()}
            steps.append({names[id(param)]: group["lr"] for group in optimizer.param_groups for param in group["params"]})

    handle = register_optimizer_step_pre_hook(record)
    yield steps
    handle.remove()


@pytest.mark.parametrize("spelling", [RELEASE_RAMP, ["--llrd_end", "1.0"]], ids=["release-kwargs", "llrd_end-flag"])
def test_layer_decay_ramp_steps_every_tensor_at_the_papers_lr(tmp_path, classifier_dir, dataset_dir, spelling, optimiser_steps):
    """The release's ramp command line (or --llrd_end): every tensor's lr at every step is the paper's formula, and
    the log shows the lowest group's (the embeddings') lr and the decay of that step."""
    total, warmup = 12, 3
    extra = ["--do_train", "--max_steps", str(total), "--warmup_steps", str(warmup), "--logging_steps", "1"]
    extra += ["--save_strategy", "no", "--use_ema", "False", "--head_lr", str(HEAD_LR), "--llrd", "0.35", *spelling]
    output_dir = tmp_path / "sft"
    train_finetune.main(finetune_argv(classifier_dir, dataset_dir, output_dir, *extra))  # at --learning_rate LR

    assert len(optimiser_steps) == total
    assert any(".encoder.layer.0." in name for name in optimiser_steps[0])
    for step, rates in enumerate(optimiser_steps):
        for name, rate in rates.items():
            assert rate == pytest.approx(paper_ramp_lr(name, step, total, warmup), rel=1e-9, abs=0), (step, name)
    logged = [entry for entry in log_history(output_dir) if "learning_rate" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, total + 1))
    for entry in logged:  # the lr and the decay the step just taken ran with
        step = entry["step"] - 1
        assert entry["learning_rate"] == pytest.approx(paper_ramp_lr("vit_nepa.embeddings.cls_token", step, total, warmup), rel=1e-9)
        assert entry["layer_decay"] == pytest.approx(0.35 + 0.65 * (1 - math.cos(math.pi * step / total)) / 2, rel=1e-9)


def test_layer_decay_ramp_resumes_mid_ramp_exactly(tmp_path, classifier_dir, dataset_dir, optimiser_steps):
    """A run restarted from its step-4 checkpoint of 8 takes steps 5 to 8 at the same lrs and ends with the same weights
    (augmentation off, as in test_ema_survives_a_resume)."""
    extra = ["--do_train", "--max_steps", "8", "--warmup_steps", "2", "--save_steps", "4", "--use_ema", "False"]
    extra += ["--llrd", "0.35", *RELEASE_RAMP, "--drop_path", "0"]
    extra += ["--aa", "", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--smoothing", "0"]
    whole, resumed = finetune_whole_and_resumed(tmp_path, classifier_dir, dataset_dir, extra, "checkpoint-4")
    assert len(optimiser_steps) == 8 + 4
    assert optimiser_steps[8:] == optimiser_steps[4:8]
    assert optimiser_steps[4] != optimiser_steps[5]
    expected, actual = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


FINETUNE_ARGUMENTS = (train_finetune.FinetuneArguments, DataArguments, train_finetune.FinetuneTrainingArguments)


def schedule_flags(*flags: str):
    return parse_arguments(FINETUNE_ARGUMENTS, ["--model_name_or_path", "unused", "--output_dir", "unused", *flags])


@pytest.mark.parametrize(
    "flags, end",
    [
        ([], None),
        (["--lr_scheduler_kwargs", '{"custom_scheduler_type": "llrd_cosine_warmup"}'], None),
        (["--lr_scheduler_kwargs", '{"custom_scheduler_type": "llrd_cosine"}'], 0.65),  # constant, one warm-up for all
        (RELEASE_RAMP, 1.0),
        (["--llrd_end", "1.0"], 1.0),
        ([*RELEASE_RAMP, "--llrd_end", "1.0"], 1.0),
    ],
)
def test_the_flags_choose_the_layer_decay_schedule(flags, end):
    """None: llrd_cosine_warmup (constant decay, per-group warm-up); a number: llrd_cosine, ramping to it."""
    args, _, training_args = schedule_flags(*flags)
    assert train_finetune.layer_decay_end(args, training_args) == end


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr_scheduler_kwargs", '{"custom_scheduler_type": "llrd_cosine_warmup", "llrd_end": 1.0}'], "takes the release's two"),
        (["--lr_scheduler_kwargs", '{"custom_scheduler_type": "llrd_cosine", "llrd_end": "high"}'], "takes the release's two"),
        (["--lr_scheduler_kwargs", '{"custom_scheduler_type": "cosine_ramp"}'], "takes the release's two"),
        (["--lr_scheduler_kwargs", '{"custom_scheduler_type": "llrd_cosine_warmup"}', "--llrd_end", "1.0"], "keeps it constant"),
        ([*RELEASE_RAMP, "--llrd_end", "0.9"], "disagree: pass one"),
        (["--llrd", "0", "--llrd_end", "1.0"], "must be above 0"),
    ],
)
def test_contradictory_layer_decay_schedules_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        args, _, training_args = schedule_flags(*flags)
        train_finetune.layer_decay_end(args, training_args)


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


def test_ema_is_the_hand_computed_average_and_applying_it_is_reversible():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))  # BatchNorm: an integer buffer too
    decay = 0.8
    ema = ModelEMA(model, decay)
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
        for name, tensor in model.state_dict().items():
            if name in expected:
                expected[name] = decay * expected[name] + (1 - decay) * tensor
    averaged = {name: tensor.clone() for name, tensor in ema.state_dict().items()}
    assert set(averaged) == set(expected)  # num_batches_tracked is an integer: not averaged
    for name in expected:
        torch.testing.assert_close(averaged[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)

    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with ema.applied():
        for name in expected:
            torch.testing.assert_close(model.state_dict()[name], averaged[name], rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)
    for name, tensor in ema.state_dict().items():
        torch.testing.assert_close(tensor, averaged[name], rtol=0, atol=0)


def finetune_whole_and_resumed(tmp_path, classifier_dir, dataset_dir, extra, checkpoint) -> tuple[Path, Path]:
    """One fine-tuning run, and the same command restarted in a new output_dir holding only its `checkpoint`."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train_finetune.main(finetune_argv(classifier_dir, dataset_dir, whole, *extra))
    resumed.mkdir()
    shutil.copytree(whole / checkpoint, resumed / checkpoint)
    train_finetune.main(finetune_argv(classifier_dir, dataset_dir, resumed, *extra))
    return whole, resumed


def test_ema_survives_a_resume(tmp_path, classifier_dir, dataset_dir):
    """An uninterrupted 6-step run against the same command restarted from its step-4 checkpoint: the same EMA.

    Both runs have max_steps 6, so their lr schedules agree (a run stopped by max_steps 4 would have decayed
    its lr to 0 by step 4 and trained other weights). Crops, flips and the RoPE scale augmentation still draw
    random numbers; the Trainer restores the data order and the RNG states from the checkpoint, and on one
    CPU thread the two runs agree bit for bit."""
    no_randomness = ["--aa", "", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--smoothing", "0"]
    no_randomness += ["--drop_path", "0"]
    ema = ["--use_ema", "True", "--ema_decay", "0.9"]
    extra = ["--do_train", "--max_steps", "6", "--save_steps", "4", *ema, *no_randomness]
    whole, resumed = finetune_whole_and_resumed(tmp_path, classifier_dir, dataset_dir, extra, "checkpoint-4")
    assert json.loads((resumed / "trainer_state.json").read_text())["global_step"] == 6

    at_step_4 = load_file(whole / "checkpoint-4" / "model_ema.safetensors")
    expected = load_file(whole / "model_ema.safetensors")
    actual = load_file(resumed / "model_ema.safetensors")
    assert any(not torch.equal(expected[key], at_step_4[key]) for key in expected)  # steps 5 and 6 moved it
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7, msg=lambda text, key=key: f"{key}: {text}")


def test_best_checkpoint_is_loaded_with_its_own_ema(tmp_path, classifier_dir, dataset_dir, monkeypatch):
    """--load_best_model_at_end with a metric that makes checkpoint 1 of 4 the best: the output folder's weights and
    EMA are checkpoint 1's, and the final evaluation reports checkpoint 1's raw and EMA metrics."""
    calls = iter(range(1000))

    def first_is_best(prediction):  # every evaluation scores lower than the one before
        return {**accuracy_metrics(prediction), "earliness": -next(calls)}

    monkeypatch.setattr(train_finetune, "accuracy_metrics", first_is_best)
    output_dir = tmp_path / "sft"
    extra = ["--do_train", "--do_eval", "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "1"]
    extra += ["--save_steps", "1", "--load_best_model_at_end", "True", "--metric_for_best_model", "eval_ema_earliness"]
    extra += ["--greater_is_better", "True", "--ema_decay", "0.5", "--drop_path", "0"]
    metrics = train_finetune.main(finetune_argv(classifier_dir, dataset_dir, output_dir, *extra))

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).name == "checkpoint-1"
    best, last = output_dir / "checkpoint-1", output_dir / "checkpoint-4"
    for weights in ("model.safetensors", "model_ema.safetensors"):
        saved, selected, final = (load_file(folder / weights) for folder in (output_dir, best, last))
        assert any(not torch.equal(selected[key], final[key]) for key in selected), weights
        for key in selected:
            assert torch.equal(saved[key], selected[key]), f"{weights} {key}"
    at_step_1 = {key: value for entry in state["log_history"] if entry["step"] == 1 for key, value in entry.items()}
    for key in ("eval_loss", "eval_ema_loss", "eval_accuracy", "eval_ema_accuracy"):
        assert metrics[key] == pytest.approx(at_step_1[key], abs=1e-6), key


def test_evaluation_alone_reads_the_folders_ema(tmp_path, classifier_dir, dataset_dir):
    """--do_eval without --do_train evaluates the folder's model_ema.safetensors as eval_ema_* (the numbers the
    training run's own final evaluation gave); a folder without one gets no eval_ema_* at all."""
    trained_dir = tmp_path / "sft"
    extra = ["--do_train", "--do_eval", "--max_steps", "3", "--save_strategy", "no", "--ema_decay", "0.5"]
    trained = train_finetune.main(finetune_argv(classifier_dir, dataset_dir, trained_dir, *extra))
    assert trained["eval_ema_loss"] != pytest.approx(trained["eval_loss"], abs=1e-4)  # the EMA lags the weights

    evaluated = train_finetune.main(finetune_argv(trained_dir, dataset_dir, tmp_path / "eval", "--do_eval"))
    for key in EVAL_KEYS | EMA_EVAL_KEYS:
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key

    without_ema = train_finetune.main(finetune_argv(classifier_dir, dataset_dir, tmp_path / "eval_cls", "--do_eval"))
    assert EVAL_KEYS <= set(without_ema) and not EMA_EVAL_KEYS & set(without_ema)


def test_compiled_finetuning_saves_plain_names_and_resumes_exactly(tmp_path, classifier_dir, dataset_dir):
    """`--torch_compile True`, as the recipe scripts run: the checkpoints keep the model's own tensor names (no
    `_orig_mod.`), the EMA follows the compiled model, and a restart from a checkpoint ends with the same weights,
    with drop path and the full augmentation recipe drawing random numbers on both sides of the restart."""
    extra = ["--do_train", "--max_steps", "4", "--save_steps", "2", "--use_ema", "True", "--ema_decay", "0.9"]
    extra += ["--drop_path", "0.1", "--torch_compile", "True"]
    whole, resumed = finetune_whole_and_resumed(tmp_path, classifier_dir, dataset_dir, extra, "checkpoint-2")

    names = set(load_file(classifier_dir / "model.safetensors"))
    for weights in ("model.safetensors", "model_ema.safetensors"):
        expected, actual = load_file(whole / weights), load_file(resumed / weights)
        assert set(expected) == set(actual) == names
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=lambda text, key=key: f"{weights} {key}: {text}")


# --------------------------------------------------------------------------------------------
# Mixup, metrics, protocols
# --------------------------------------------------------------------------------------------


def test_mixup_labels_are_distributions_and_an_odd_batch_drops_one_image():
    args = train_finetune.FinetuneArguments(model_name_or_path="unused")  # the recipe's defaults
    augment = train_finetune.batch_augment(args, num_labels=5, device="cpu")
    torch.manual_seed(0)
    pixels, labels = augment(torch.randn(7, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([0, 1, 2, 3, 4, 0, 1]))
    assert pixels.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE) and labels.shape == (6, 5)
    assert labels.is_floating_point() and (labels >= 0).all()
    torch.testing.assert_close(labels.sum(dim=1), torch.ones(6))
    assert (labels.max(dim=1).values < 1).all()  # smoothed (and mixed): never one-hot

    off = train_finetune.FinetuneArguments(model_name_or_path="unused", reprob=0, mixup=0, cutmix=0, smoothing=0)
    assert train_finetune.batch_augment(off, num_labels=5, device="cpu") is None


def test_accuracy_metrics_on_hand_made_logits():
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 6],  # label 0: top-1
            [0.0, 9, 8, 7, 6, 5, 1],  # label 5: 5th best, top-5 only
            [0.0, 9, 8, 7, 6, 5, 1],  # label 6: 6th best, neither
            [1.0, 2, 3, 4, 5, 6, 9],  # label 5: 2nd best, top-5 only
        ]
    )
    labels = torch.tensor([0, 5, 6, 5])
    top5, nll = top5_and_nll((logits,), labels)  # the Trainer may hand over a tuple
    assert top5.tolist()[1] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(nll, torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
    metrics = accuracy_metrics(EvalPrediction(predictions=(top5.numpy(), nll.numpy()), label_ids=labels.numpy()))
    assert metrics == {"accuracy": 0.25, "top5": 0.75, "loss": pytest.approx(nll.mean().item())}
    assert top5_indices(logits[:, :3]).shape == (4, 3)  # fewer than 5 classes: all of them


# --------------------------------------------------------------------------------------------
# Scripts
# --------------------------------------------------------------------------------------------


def test_shell_scripts_parse():
    scripts = sorted((REPO / "scripts").rglob("*.sh"))
    if not scripts:
        pytest.skip("no scripts/**/*.sh yet")
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.relative_to(REPO)}: {result.stderr}"


def test_shell_scripts_run_python_through_one_interpreter_choice():
    """Every script runs "$PYTHON" as scripts/python.sh chooses it, never a bare python from the PATH."""
    bare = re.compile(r"(^|[\s;&|(])(exec\s+)?python3?\s")
    for script in sorted([*(REPO / "scripts").rglob("*.sh"), *(REPO / "bench").rglob("*.sh")]):
        for number, line in enumerate(script.read_text().splitlines(), 1):
            code = re.sub(r"\"[^\"]*\"|'[^']*'", "", line.split("#", 1)[0])  # quoted text is a message, not a command
            assert not bare.search(code), f"{script.relative_to(REPO)}:{number} runs a bare python: {line.strip()}"


RECIPES = {
    "pretrain/nepa_b.sh": (train_pretrain, ("ModelArguments", "MonitorArguments")),
    "pretrain/nepa_l.sh": (train_pretrain, ("ModelArguments", "MonitorArguments")),
    "finetune/nepa_b_sft.sh": (train_finetune, ("FinetuneArguments",)),
    "finetune/nepa_l_sft.sh": (train_finetune, ("FinetuneArguments",)),
    "eval/nepa_b_sft_eval.sh": (eval_script, ("EvalArguments",)),
    "eval/nepa_l_sft_eval.sh": (eval_script, ("EvalArguments",)),
}


def test_recipe_scripts_count_the_gpus_torch_sees(tmp_path):
    """torch's count honours CUDA_VISIBLE_DEVICES (nvidia-smi's does not); NPROC_PER_NODE overrides it."""
    fake_torch = tmp_path / "torch"
    fake_torch.mkdir()
    (fake_torch / "__init__.py").write_text(
        "import os, types\n"
        "cuda = types.SimpleNamespace(device_count=lambda: len(os.environ['CUDA_VISIBLE_DEVICES'].split(',')))\n"
    )
    count = ["bash", "-c", f"source {REPO / 'scripts' / 'common.sh'} && echo $GPUS"]
    env = {**os.environ, "PYTHON": sys.executable, "REPORT_TO": "none", "PYTHONPATH": str(tmp_path)}
    env.pop("NPROC_PER_NODE", None)
    for visible, expected in (("0,1,2,3", "4"), ("5", "1")):
        result = subprocess.run(count, env={**env, "CUDA_VISIBLE_DEVICES": visible}, capture_output=True, text=True)
        assert result.stdout.strip() == expected, result.stderr
    result = subprocess.run(count, env={**env, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "NPROC_PER_NODE": "2"}, capture_output=True, text=True)
    assert result.stdout.strip() == "2"
    real_torch = {key: value for key, value in env.items() if key != "PYTHONPATH"}
    result = subprocess.run(count, env={**real_torch, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    assert result.stdout.strip() == "1"  # no GPU: one process


def test_recipe_switch_runs_the_papers_layer_decay_ramp(tmp_path):
    """nepa_b_sft.sh runs the release's constant decay 0.65, and RECIPE=paper the paper's ramp 0.35 -> 1.0; RECIPE=paper
    for ViT-L (no published ramp) and an unknown RECIPE are refused before anything is launched."""

    def schedule(**env) -> tuple[float, float | None]:
        argv = recipe_command(tmp_path, "finetune/nepa_b_sft.sh", **env)
        args, _, training_args = parse_arguments(FINETUNE_ARGUMENTS, argv[1:])
        return args.llrd, train_finetune.layer_decay_end(args, training_args)

    assert schedule() == schedule(RECIPE="release") == (0.65, None)
    assert schedule(RECIPE="paper") == (0.35, 1.0)
    refusals = [("nepa_l_sft.sh", "paper", "publishes its layer-decay ramp for ViT-B only"), ("nepa_b_sft.sh", "papers", "RECIPE=papers: unknown")]
    for script, recipe, message in refusals:
        env = {**os.environ, "RECIPE": recipe, "MODEL": str(tmp_path), "DRY_RUN": "1", "NPROC_PER_NODE": "1", "REPORT_TO": "none"}
        result = subprocess.run(["bash", str(REPO / "scripts" / "finetune" / script)], env=env, capture_output=True, text=True)
        assert result.returncode == 1 and message in result.stderr and not result.stdout, (script, result.stdout, result.stderr)


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_recipe_scripts_launch_a_command_their_entry_point_accepts(tmp_path, script):
    """Every flag a recipe passes exists, parses and is used by the run (the entry point's FLAG_USES); training runs
    compile, use fused AdamW, bf16 and persistent workers (docs/performance.md), and NUM_WORKERS=0 turns persistence
    off (torch refuses it without workers)."""
    module, names = RECIPES[script]
    classes = (DataArguments, NepaTrainingArguments, *(getattr(module, name) for name in names))
    argv = recipe_command(tmp_path, script)
    assert argv[0] == Path(module.__file__).name and argv[-2:] == ["--use_cpu", "True"]
    _, training_args, *script_args = parse_arguments(classes, argv[1:], module.FLAG_USES)
    assert training_args.bf16
    if "eval/" in script:
        return
    assert not training_args.ddp_find_unused_parameters
    assert training_args.torch_compile and training_args.optim == "adamw_torch_fused"
    assert training_args.dataloader_num_workers == 10 and training_args.dataloader_persistent_workers
    if "pretrain/" in script:  # the k-NN monitor, at the cost docs/performance.md computes
        assert script_args[1].knn_eval_steps == 5000 and training_args.per_device_eval_batch_size == training_args.per_device_train_batch_size

    argv = recipe_command(tmp_path, script, NUM_WORKERS="0")
    _, training_args, *_ = parse_arguments(classes, argv[1:])
    assert training_args.dataloader_num_workers == 0 and not training_args.dataloader_persistent_workers

