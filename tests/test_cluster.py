"""Runs on a cluster: a stop signal writes a checkpoint and the rerun resumes exactly, timed checkpoints and their
retention, old checkpoints outliving the write of their successor, an EMA that follows replaced tensors and refuses
sharded set-ups, several "nodes" on one machine, and the launch line the recipe scripts build. Tiny models on CPU."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_reliability import (
    REPO,
    SUBPROCESS_ENV,
    assert_same_tensors,
    complete_checkpoints,
    global_step,
    logged_losses,
    pretrain_args,
    tiny_dataset,  # noqa: F401 (fixture)
    tiny_model,  # noqa: F401 (fixture)
)

import train_pretrain
from nepa.args import NepaTrainingArguments
from nepa.ema import ModelEMA
from nepa.preemption import PREEMPTED_EXIT_STATUS
from nepa.trainer import CHECKPOINT_COMPLETE, NonFiniteLossGuard

# Runs `train_pretrain.py` with its arguments, sending SIGNAL to this process (or, under torchrun, to the process of
# rank SIGNAL_RANK) during the SIGNAL_AT-th training forward, i.e. inside an optimiser step.
SIGNAL_DURING_FORWARD = """\
import itertools, os, signal
import train_pretrain
from models.vit_nepa import ViTNepaForPreTraining

forward, calls = ViTNepaForPreTraining.forward, itertools.count(1)

def signalled(self, *args, **kwargs):
    if self.training and next(calls) == int(os.environ["SIGNAL_AT"]) and os.environ.get("RANK", "0") == os.environ.get("SIGNAL_RANK", "0"):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    return forward(self, *args, **kwargs)

ViTNepaForPreTraining.forward = signalled
train_pretrain.main()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_signalled(tmp_path: Path, argv: list[str], signal_name: str, at_forward: int, launcher: list[str] = (), **env):
    script = tmp_path / "signalled.py"
    script.write_text(SIGNAL_DURING_FORWARD)
    environment = {**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1", "SIGNAL": signal_name, "SIGNAL_AT": str(at_forward), **env}
    command = [sys.executable, *launcher, str(script), *argv]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


def checkpoint_files(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


# --- preemption -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_stop_signal_saves_the_step_it_arrived_in_and_the_rerun_resumes_exactly(signal_name, tmp_path, tiny_model, tiny_dataset):
    """The signal arrives in the first micro-batch of optimiser step 3 (two micro-batches a step): the run finishes
    that step, writes one complete checkpoint-3 (weights, optimiser, scheduler, RNG, EMA, state) and exits with the
    requeue status. The same command again resumes from it and ends with the uninterrupted run's losses, weights and
    EMA, bit for bit."""
    flags = dict(max_steps=6, save_steps=100, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    flags.update(use_ema=True, ema_decay=0.9)
    reference = tmp_path / "uninterrupted"
    train_pretrain.main(pretrain_args(tiny_model, tiny_dataset, reference, **flags))

    output_dir = tmp_path / "preempted"
    argv = pretrain_args(tiny_model, tiny_dataset, output_dir, **flags)
    result = run_signalled(tmp_path, argv, signal_name, at_forward=5)  # forwards 5 and 6 are step 3's
    assert result.returncode == PREEMPTED_EXIT_STATUS, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{signal_name}: finishing this optimiser step" in result.stderr
    assert complete_checkpoints(output_dir) == [3]
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint-3"]
    expected = {"model.safetensors", "model_ema.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
    assert expected | {"trainer_state.json", CHECKPOINT_COMPLETE} <= checkpoint_files(output_dir / "checkpoint-3")

    train_pretrain.main(argv)
    assert global_step(output_dir) == 6
    assert logged_losses(output_dir) == logged_losses(reference)
    for weights in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(output_dir / weights, reference / weights)


def test_save_every_minutes_with_a_retention_limit(tmp_path, tiny_model, tiny_dataset):
    """A cadence shorter than a step saves after every step, and --save_total_limit 2 keeps the two newest."""
    flags = dict(max_steps=5, save_steps=100, save_every_minutes=1e-6, save_total_limit=2)
    output_dir = tmp_path / "timed"
    train_pretrain.main(pretrain_args(tiny_model, tiny_dataset, output_dir, **flags))
    assert complete_checkpoints(output_dir) == [4, 5]
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    with pytest.raises(ValueError, match="--save_every_minutes 0: give a positive number of minutes"):
        NepaTrainingArguments(output_dir=str(tmp_path / "never"), save_every_minutes=0)


def test_the_newest_complete_checkpoint_outlives_the_write_of_its_successor(tmp_path, tiny_model, tiny_dataset, monkeypatch):
    """--save_total_limit 1 (the release's fine-tuning setting): a crash while checkpoint-4 is written, after its files
    but before its marker, leaves checkpoint-2 complete, and the same command resumes from it to the uninterrupted
    run's weights. (The Trainer's own rotation deleted checkpoint-2 inside the save, before the marker.)"""
    flags = dict(max_steps=6, save_steps=2, save_total_limit=1)
    reference = tmp_path / "uninterrupted"
    train_pretrain.main(pretrain_args(tiny_model, tiny_dataset, reference, **flags))
    assert complete_checkpoints(reference) == [6]

    real_on_save = NonFiniteLossGuard.on_save  # the last hook before the marker is written

    def crash_at_step_4(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise KeyboardInterrupt("killed while checkpoint-4 was written")
        return real_on_save(self, args, state, control, **kwargs)

    monkeypatch.setattr(NonFiniteLossGuard, "on_save", crash_at_step_4)
    output_dir = tmp_path / "crashed"
    argv = pretrain_args(tiny_model, tiny_dataset, output_dir, **flags)
    with pytest.raises(KeyboardInterrupt):
        train_pretrain.main(argv)
    assert complete_checkpoints(output_dir) == [2]
    monkeypatch.setattr(NonFiniteLossGuard, "on_save", real_on_save)

    train_pretrain.main(argv)
    assert complete_checkpoints(output_dir) == [6]
    assert logged_losses(output_dir) == logged_losses(reference)
    assert_same_tensors(output_dir / "model.safetensors", reference / "model.safetensors")


# --- the EMA follows the weights it averages ------------------------------------------------------------------------


def test_ema_follows_tensors_that_a_move_or_cast_replaces():
    """`model.to(...)` gives every parameter and buffer new storage (as a move to the GPU does): the average goes on
    following the weights, and applying it to a model cast to bf16 leaves the model's weights and the average exact."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = ModelEMA(model, decay=0.5)
    model.to(torch.float64).to(torch.float32)  # new storage for every tensor, as `.to("cuda")`
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        model[1].running_mean.add_(1.0)
    before = {name: tensor.clone() for name, tensor in ema.state_dict().items()}
    ema.update()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(ema.state_dict()[name], (before[name] + tensor) / 2, rtol=0, atol=1e-7, msg=name)

    averaged = ema.state_dict()
    model.to(torch.bfloat16)  # what --bf16_full_eval does to the model before evaluating
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with ema.applied():
        for name, tensor in model.state_dict().items():
            if name in averaged:
                assert torch.equal(tensor, averaged[name].to(torch.bfloat16)), name
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    for name, tensor in ema.state_dict().items():
        assert torch.equal(tensor, averaged[name]), name  # not rounded to bf16


def test_bf16_full_eval_evaluates_the_ema(tmp_path, tiny_model, tiny_dataset):
    """--bf16_full_eval casts the model before the final evaluation; the EMA's metrics are still the EMA's."""
    flags = dict(max_steps=3, ema_decay=0.9, use_ema=True, bf16_full_eval=True)
    metrics = train_pretrain.main([*pretrain_args(tiny_model, tiny_dataset, tmp_path / "run", **flags), "--do_eval"])
    assert metrics["eval_ema_loss"] != metrics["eval_loss"]


@pytest.mark.parametrize(
    "flags, environment, named",
    [
        (["--fsdp", "full_shard"], {}, "--fsdp"),
        ([], {"ACCELERATE_USE_FSDP": "true"}, "ACCELERATE_USE_FSDP=true"),
        ([], {"ACCELERATE_USE_DEEPSPEED": "true"}, "ACCELERATE_USE_DEEPSPEED=true"),
        (["--deepspeed", "ds_config.json"], {}, "--deepspeed"),
    ],
    ids=["--fsdp", "accelerate-config-fsdp", "accelerate-config-deepspeed", "--deepspeed"],
)
def test_sharded_set_ups_are_refused_while_the_ema_is_on(flags, environment, named, tmp_path, tiny_model, tiny_dataset, monkeypatch):
    """However FSDP or DeepSpeed is switched on (a flag, or the variables `accelerate launch` sets from a config
    file), the EMA could not follow the sharded weights: refused before anything runs, naming the way out."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    argv = [*pretrain_args(tiny_model, tiny_dataset, tmp_path / "run", max_steps=1), *flags]
    with pytest.raises(ValueError, match=f"{named} with --use_ema True .* or pass --use_ema False"):
        train_pretrain.main(argv)
    assert not (tmp_path / "run").exists()
