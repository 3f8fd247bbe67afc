"""Runs on a cluster: a stop signal writes a checkpoint and the rerun resumes exactly, timed checkpoints and their
retention, old checkpoints outliving the write of their successor, a checkpoint that cannot be written (a real
small tmpfs where root can mount one, else an error injected into the writer), an EMA that follows replaced tensors
and refuses sharded set-ups, several "nodes" on one machine, and the launch line the recipe scripts build. Tiny
models on CPU."""

import errno
import itertools
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_reliability import (
    REAL_PRETRAINING_FORWARD,
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
from models.vit_nepa import ViTNepaForPreTraining
from nepa.args import NepaTrainingArguments
from nepa.checkpoint import CHECKPOINT_COMPLETE, CheckpointWriteError, folder_size
from nepa.ema import ModelEMA
from nepa.nonfinite import NonFiniteLossGuard
from nepa.preemption import PREEMPTED_EXIT_STATUS

# Runs `train_pretrain.py` with its arguments; the process of rank SIGNAL_RANK (default 0) sends SIGNAL to itself, to
# process SIGNAL_PID (its node's launcher), with SIGNAL_GROUP=1 to its whole process group (data-loading workers
# included), or with SIGNAL_TREE=1 to SIGNAL_PID and every process below it (launcher, torchrun, training processes and
# their workers, as slurmstepd signals every process of a job step), during its SIGNAL_AT-th training forward, i.e.
# inside an optimiser step. With TIMES_DIR, each process writes the time it exits to TIMES_DIR/exit-RANK, and process 0
# the time it finished deleting old checkpoints (taking 2 s longer) to TIMES_DIR/deleted.
SIGNAL_DURING_FORWARD = """\
import atexit, glob, itertools, os, signal, subprocess, time
import nepa.trainer
import train_pretrain
from models.vit_nepa import ViTNepaForPreTraining

forward, calls = ViTNepaForPreTraining.forward, itertools.count(1)
rank = os.environ.get("RANK", "0")

def process_tree(root):
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            parent = int(open(stat).read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.split("/")[2]))
    tree, unseen = [], [root]
    while unseen:
        tree.append(unseen.pop())
        unseen += children.get(tree[-1], [])
    return tree

def signalled(self, *args, **kwargs):
    if self.training and next(calls) == int(os.environ["SIGNAL_AT"]) and rank == os.environ.get("SIGNAL_RANK", "0"):
        name = os.environ["SIGNAL"]
        # A group or tree is signalled by another process, as by a scheduler or torchrun: torch's workers tell a
        # SIGTERM from their own training process apart.
        if os.environ.get("SIGNAL_GROUP"):
            subprocess.run(["kill", "-s", name[3:], "--", f"-{os.getpgid(0)}"])
        elif os.environ.get("SIGNAL_TREE"):
            subprocess.run(["kill", "-s", name[3:], *map(str, process_tree(int(os.environ["SIGNAL_PID"])))])
        else:
            os.kill(int(os.environ.get("SIGNAL_PID", os.getpid())), getattr(signal, name))
    return forward(self, *args, **kwargs)

ViTNepaForPreTraining.forward = signalled
if os.environ.get("TIMES_DIR"):
    times = os.environ["TIMES_DIR"]
    atexit.register(lambda: open(f"{times}/exit-{rank}", "w").write(repr(time.time())))
    delete = nepa.trainer.delete_old_checkpoints

    def slow_delete(*args, **kwargs):
        time.sleep(2)
        delete(*args, **kwargs)
        open(f"{times}/deleted", "w").write(repr(time.time()))

    nepa.trainer.delete_old_checkpoints = slow_delete
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
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300, start_new_session=True)


def checkpoint_files(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


# --- preemption -----------------------------------------------------------------------------------------------------


def test_stop_signal_saves_the_step_it_arrived_in_and_the_rerun_resumes_exactly(tmp_path, tiny_model, tiny_dataset):
    """SIGTERM arrives in the first micro-batch of optimiser step 3 (two micro-batches a step): the run finishes
    that step, writes one complete checkpoint-3 (weights, optimiser, scheduler, RNG, EMA, state) and exits with the
    requeue status. The same command again resumes from it and ends with the uninterrupted run's losses, weights and
    EMA, bit for bit. (SIGUSR1 takes the same path: the next test.)"""
    signal_name = "SIGTERM"
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


@pytest.mark.parametrize("signal_name", ["SIGUSR1", "SIGTERM"])
def test_a_stop_signal_to_every_process_leaves_the_data_loading_workers_running(signal_name, tmp_path, tiny_model, tiny_dataset):
    """The signal to the whole process group, as a scheduler signals every process of a job (and torchrun a training
    process's group), with two persistent data-loading workers: the workers ignore it (torch's own SIGTERM handler
    would end them, and the training process with "DataLoader worker ... killed by signal"), the training process
    alone takes it, and the run saves checkpoint-3 and exits 75."""
    flags = dict(max_steps=6, save_steps=100, per_device_train_batch_size=2)
    flags.update(dataloader_num_workers=2, dataloader_persistent_workers=True)
    output_dir = tmp_path / "preempted"
    argv = pretrain_args(tiny_model, tiny_dataset, output_dir, **flags)
    result = run_signalled(tmp_path, argv, signal_name, at_forward=3, SIGNAL_GROUP="1")
    assert result.returncode == PREEMPTED_EXIT_STATUS, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.count(f"{signal_name}: finishing this optimiser step") == 1
    assert complete_checkpoints(output_dir) == [3]


@pytest.mark.parametrize(
    "flags, saved",
    [
        (dict(max_steps=6, save_steps=2, eval_strategy="steps", eval_steps=2), [2, 4]),
        (dict(max_steps=8, save_strategy="epoch", eval_strategy="epoch"), [4]),  # 4 steps an epoch: step 4 ends one
    ],
    ids=["steps", "epoch"],
)
def test_a_stop_on_an_evaluation_step_evaluates_before_it_saves(flags, saved, tmp_path, tiny_model, tiny_dataset, monkeypatch):
    """Evaluations every 2 steps, or every epoch (the fine-tuning recipes'), the best checkpoint chosen by the loss;
    SIGUSR1 during step 4: the run evaluates step 4 before it saves checkpoint-4 and exits 75, so the rerun's
    evaluations, best metric and best checkpoint are the uninterrupted run's (and so are its weights)."""
    flags = dict(flags, metric_for_best_model="loss")
    reference = tmp_path / "uninterrupted"
    train_pretrain.main([*pretrain_args(tiny_model, tiny_dataset, reference, **flags), "--do_eval"])

    calls = itertools.count(1)

    def signalled(self, *args, **kwargs):
        if self.training and next(calls) == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        return REAL_PRETRAINING_FORWARD(self, *args, **kwargs)

    monkeypatch.setattr(ViTNepaForPreTraining, "forward", signalled)
    output_dir = tmp_path / "preempted"
    argv = [*pretrain_args(tiny_model, tiny_dataset, output_dir, **flags), "--do_eval"]
    with pytest.raises(SystemExit) as stop:
        train_pretrain.main(argv)
    assert stop.value.code == PREEMPTED_EXIT_STATUS
    assert complete_checkpoints(output_dir) == saved
    monkeypatch.setattr(ViTNepaForPreTraining, "forward", REAL_PRETRAINING_FORWARD)
    train_pretrain.main(argv)

    def selection(folder: Path) -> tuple:
        state = json.loads((folder / "trainer_state.json").read_text())
        evaluations = [(entry["step"], entry["eval_loss"]) for entry in state["log_history"] if "eval_loss" in entry]
        return evaluations, state["best_metric"], Path(state["best_model_checkpoint"]).name

    assert 4 in [step for step, _ in selection(reference)[0]]
    assert selection(output_dir) == selection(reference)
    assert_same_tensors(output_dir / "model.safetensors", reference / "model.safetensors")


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


# --- checkpoint writes that fail: a full disk, a quota, an I/O error -------------------------------------------------

WRITE_FLAGS = dict(max_steps=6, save_steps=2, use_ema=True, ema_decay=0.9)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train_pretrain.main(pretrain_args(tiny_model, tiny_dataset, output_dir, **WRITE_FLAGS))
    return output_dir


def assert_resumes_exactly(argv: list[str], output_dir: Path, uninterrupted: Path) -> None:
    train_pretrain.main(argv)
    assert complete_checkpoints(output_dir) == [2, 4, 6]
    assert logged_losses(output_dir) == logged_losses(uninterrupted)
    for weights in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(output_dir / weights, uninterrupted / weights)


def test_a_full_disk_stops_with_one_message_and_the_rerun_resumes_exactly(tmp_path, tiny_model, tiny_dataset, uninterrupted, monkeypatch):
    """The optimiser's write into checkpoint-4 fails with ENOSPC."""
    real_save = torch.save

    def full_disk(obj, file, *args, **kwargs):
        if str(file).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    output_dir = tmp_path / "run"
    argv = pretrain_args(tiny_model, tiny_dataset, output_dir, **WRITE_FLAGS)
    with pytest.raises(CheckpointWriteError) as failure:
        train_pretrain.main(argv)
    message = str(failure.value)
    assert f"Could not write the checkpoint {output_dir / 'checkpoint-4'} (process 0: OSError: [Errno 28] No space left on device" in message
    assert "free on its filesystem, against" in message and "for the previous checkpoint" in message
    assert f"A rerun resumes from {output_dir / 'checkpoint-2'}" in message
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint-2"]

    monkeypatch.setattr(torch, "save", real_save)
    assert_resumes_exactly(argv, output_dir, uninterrupted)


@pytest.fixture
def small_disk(tmp_path, uninterrupted):
    """A tmpfs that holds one checkpoint and half of a second (or a skip saying why none can be mounted)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    size = folder_size(uninterrupted / "checkpoint-2") * 3 // 2 + 64 * 1024  # files take whole 4 KiB pages
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"no tmpfs to fill: `mount -t tmpfs` failed ({mount.stderr.strip()}); it needs root (CI runs as root)")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # the failed write's file may still be open


def test_a_real_full_disk_warns_then_stops_with_one_message_and_the_rerun_resumes_exactly(
    small_disk, tiny_model, tiny_dataset, uninterrupted, caplog
):
    """output_dir on a tmpfs with room for one and a half checkpoints: before checkpoint-4 a warning says that less
    is free than checkpoint-2 took; its write fails (torch's writer says only "unexpected pos"); the message says
    why; after the disk is made larger, the same command resumes from checkpoint-2 exactly."""
    output_dir = small_disk / "run"
    argv = pretrain_args(tiny_model, tiny_dataset, output_dir, **WRITE_FLAGS)
    with caplog.at_level(logging.WARNING, logger="nepa.checkpoint"), pytest.raises(CheckpointWriteError) as failure:
        train_pretrain.main(argv)
    warnings = [record.getMessage() for record in caplog.records if "that the previous checkpoint" in record.getMessage()]
    assert len(warnings) == 1 and str(output_dir / "checkpoint-2") in warnings[0], warnings
    message = str(failure.value)
    assert f"Could not write the checkpoint {output_dir / 'checkpoint-4'} (process 0: " in message
    assert f"A rerun resumes from {output_dir / 'checkpoint-2'}" in message
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint-2"]

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert_resumes_exactly(argv, output_dir, uninterrupted)


# train_pretrain.py whose process FAIL_RANK fails with EIO writing FAIL_FILE into checkpoint-4.
FAILING_WRITE = """\
import errno, os
import torch
import train_pretrain

save = torch.save

def failing(obj, file, *args, **kwargs):
    if os.environ["RANK"] == os.environ["FAIL_RANK"] and str(file).endswith(os.path.join("checkpoint-4", os.environ["FAIL_FILE"])):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(file))
    return save(obj, file, *args, **kwargs)

torch.save = failing
train_pretrain.main()
"""


def test_a_write_failing_in_one_process_stops_every_process_with_one_message(tmp_path, tiny_model, tiny_dataset):
    """Two processes; process 1's own part of checkpoint-4 (its random state) fails with EIO while process 0's writes
    succeed: both stop (process 0 is not left waiting for it), one message names process 1's error, and
    checkpoint-4 is removed, never marked."""
    script = tmp_path / "failing_write.py"
    script.write_text(FAILING_WRITE)
    output_dir = tmp_path / "run"
    argv = pretrain_args(tiny_model, tiny_dataset, output_dir, **WRITE_FLAGS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *argv, "--ddp_find_unused_parameters", "False"]
    env = {**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1", "FAIL_RANK": "1", "FAIL_FILE": "rng_state_1.pth"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-5000:]
    assert output.count("Could not write the checkpoint") == 1, output[-5000:]
    assert f"{output_dir / 'checkpoint-4'} (process 1: OSError: [Errno 5] Input/output error" in output
    assert f"A rerun resumes from {output_dir / 'checkpoint-2'}" in output
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint-2"]


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
    with pytest.raises(ValueError, match=f"{named} with --use_ema True .* Pass --use_ema False"):
        train_pretrain.main(argv)
    assert not (tmp_path / "run").exists()


# --- the low-memory recipe -----------------------------------------------------------------------------------------


def test_activation_checkpointing_under_torch_compile_trains_as_without_it(tmp_path, tiny_model, tiny_dataset):
    """`--activation_checkpointing True` with `--torch_compile True` (docs/cluster.md's recipe for 24-40 GB GPUs): the
    layers' activations are rebuilt in the backward pass, and the run gives the losses of a plain one. Not its
    weights: compiled kernels sum in another order, and AdamW, which divides each gradient by its running size,
    turns the rounding of the small gradients behind LayerScale (1e-5 at start) into steps of about the learning
    rate (measured: the attention's weights up to 7e-4 apart after 3 steps)."""
    flags = dict(max_steps=3, use_ema=True, ema_decay=0.9)
    plain, low_memory = tmp_path / "plain", tmp_path / "low_memory"
    train_pretrain.main(pretrain_args(tiny_model, tiny_dataset, plain, **flags))
    train_pretrain.main(pretrain_args(tiny_model, tiny_dataset, low_memory, activation_checkpointing=True, torch_compile=True, **flags))
    losses, reference = logged_losses(low_memory), logged_losses(plain)
    assert sorted(losses) == [1, 2, 3]
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], abs=1e-5)
    assert (low_memory / "model_ema.safetensors").is_file()


# --- launching: the recipe scripts' launch line, and several nodes on one machine -----------------------------------

LAUNCH_VARIABLES = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "DRY_RUN")


def launch_environment(**env) -> dict:
    """This process's environment without any launcher's or SLURM's variables, plus `env`."""
    clean = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES and not key.startswith("SLURM_")}
    return {**clean, "PYTHON": sys.executable, "REPORT_TO": "none", **env}


def dry_run(**env) -> subprocess.CompletedProcess:
    command = ["bash", str(REPO / "scripts" / "pretrain" / "nepa_b.sh")]
    return subprocess.run(command, env=launch_environment(**{"DRY_RUN": "1", "NPROC_PER_NODE": "8", **env}), capture_output=True, text=True)


def torchrun_options(result: subprocess.CompletedProcess) -> dict[str, str]:
    """The `--name value` options of a dry run's torchrun line, and the training script's gradient accumulation."""
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"], argv
    script = argv.index("train_pretrain.py")
    options = dict(zip(argv[3:script:2], argv[4:script:2]))
    options["accumulation"] = argv[argv.index("--gradient_accumulation_steps") + 1]
    return options


SLURM_JOB = dict(SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[07-10,12],cpu3", SLURM_JOB_ID="1234")


def test_the_launch_line_takes_the_nodes_from_slurm():
    """Under srun (one task a node) the node count, node rank and rendezvous host come from SLURM's variables, the port
    from the job id; torchrun passes SIGUSR1 on to the training processes; the batch arithmetic counts every node."""
    options = torchrun_options(dry_run(**SLURM_JOB))
    assert options["--nnodes"] == "2" and options["--node_rank"] == "1" and options["--nproc_per_node"] == "8"
    assert options["--master_addr"] == "gpu07" and options["--master_port"] == "21234"
    assert "SIGUSR1" in options["--signals_to_handle"].split(",")
    assert options["accumulation"] == "1"  # 4096 images = 256 x 8 GPUs x 2 nodes


@pytest.mark.parametrize("nodelist, first", [("cpu3,gpu[1-2]", "cpu3"), ("node-a[3,5]", "node-a3"), ("solo", "solo"), ("g[009-010]", "g009")])
def test_the_rendezvous_host_is_the_first_of_slurms_node_list(nodelist, first):
    assert torchrun_options(dry_run(**{**SLURM_JOB, "SLURM_JOB_NODELIST": nodelist}))["--master_addr"] == first


def test_explicit_names_then_the_releases_names_take_precedence_over_slurm():
    release = dict(WORLD_SIZE="4", RANK="3", MASTER_ADDR="node0", MASTER_PORT="29400")
    options = torchrun_options(dry_run(**SLURM_JOB, **release, PER_DEVICE_BATCH="128"))
    assert (options["--nnodes"], options["--node_rank"], options["--master_addr"], options["--master_port"]) == ("4", "3", "node0", "29400")
    assert options["accumulation"] == "1"  # 4096 = 128 x 8 x 4
    options = torchrun_options(dry_run(**SLURM_JOB, **release, NNODES="1", NODE_RANK="0"))
    assert (options["--nnodes"], options["--node_rank"]) == ("1", "0")
    assert options["accumulation"] == "2"


def test_one_node_without_a_cluster_runs_plain_python_when_one_process_is_enough():
    result = dry_run(NPROC_PER_NODE="1", PER_DEVICE_BATCH="64", TOTAL_BATCH="64")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[:2] == [sys.executable, "train_pretrain.py"]


@pytest.mark.parametrize(
    "env, message",
    [
        (dict(LOCAL_RANK="0", RANK="5", WORLD_SIZE="16"), "LOCAL_RANK=0 is set: this script was started once per process"),
        (dict(**SLURM_JOB, SLURM_STEP_NUM_TASKS="16", SLURM_STEP_NUM_NODES="2"), "srun started 16 tasks on 2 nodes"),
    ],
    ids=["torchrun-per-process", "srun-task-per-gpu"],
)
def test_a_launch_started_once_per_process_stops_with_a_message(env, message):
    result = dry_run(**env)
    assert result.returncode == 1 and message in result.stderr
    assert result.stdout == ""


def launch_node(tmp_path: Path, argv: list[str], name: str, **env) -> subprocess.Popen:
    """scripts/common.sh's `launch` of SIGNAL_DURING_FORWARD, as a recipe script runs it on one node; SIGNAL_PID is
    the launching shell's own process id."""
    script = tmp_path / "signalled.py"
    script.write_text(SIGNAL_DURING_FORWARD)
    shell = f'export SIGNAL_PID=$$; source {REPO / "scripts" / "common.sh"}; launch "$@"'
    environment = launch_environment(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{"NPROC_PER_NODE": "1", **env})
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(["bash", "-c", shell, "bash", str(script), *argv], env=environment, stdout=log, stderr=subprocess.STDOUT)


def run_nodes(tmp_path: Path, argv: list[str], name: str, **env) -> list[int]:
    """Two nodes of one process each on this machine, through scripts/common.sh; their exit statuses."""
    common = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "SIGNAL": "SIGUSR1", "SIGNAL_AT": "0", **env}
    nodes = [launch_node(tmp_path, argv, f"{name}-node{rank}", NODE_RANK=str(rank), **common) for rank in (0, 1)]
    return [node.wait(timeout=300) for node in nodes]


@pytest.mark.slow
def test_two_nodes_give_the_curve_of_accumulation_and_a_signal_to_one_node_resumes_exactly(tmp_path, tiny_model, tiny_dataset):
    """Two `torchrun --nnodes 2` launches of one process each (gloo, through the recipes' `launch`) against one process
    with gradient accumulation 2: the same images in each step, so the same per-step losses to float rounding (1e-4)
    and, for this tiny model, the same weights (1e-5).
    SIGUSR1 sent to node 1's launcher during step 3 (as srun passes on SLURM's warning): node 1's launcher passes
    it to torchrun, torchrun to its process, every process finishes step 3 or 4, and the run writes one complete
    checkpoint, the signalled launcher exits 75; the same launches again resume from it and end with the
    uninterrupted two-node run's losses and weights, bit for bit."""
    no_rope_augmentation = ["--config_overrides", "pos_embed_rescale=null"]  # one draw per process batch
    flags = dict(max_steps=6, save_steps=100, use_ema=True, ema_decay=0.9)
    one = tmp_path / "one_process"
    train_pretrain.main(no_rope_augmentation + pretrain_args(tiny_model, tiny_dataset, one, gradient_accumulation_steps=2, **flags))

    two = tmp_path / "two_nodes"
    assert run_nodes(tmp_path, no_rope_augmentation + pretrain_args(tiny_model, tiny_dataset, two, **flags), "whole") == [0, 0]
    losses, reference = logged_losses(two), logged_losses(one)
    assert sorted(losses) == sorted(reference) == list(range(1, 7))
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], abs=1e-4), f"loss at step {step}"
    # The weights too, here (measured: identical); a bigger model's may differ more from the summation order alone.
    assert_same_tensors(two / "model.safetensors", one / "model.safetensors", atol=1e-5)

    preempted = tmp_path / "preempted"
    argv = no_rope_augmentation + pretrain_args(tiny_model, tiny_dataset, preempted, **flags)
    statuses = run_nodes(tmp_path, argv, "preempted", SIGNAL_RANK="1", SIGNAL_AT="3")
    assert statuses[1] == PREEMPTED_EXIT_STATUS and statuses[0] != 0, statuses
    (checkpoint,) = complete_checkpoints(preempted)
    assert checkpoint in (3, 4)
    assert [path.name for path in preempted.iterdir()] == [f"checkpoint-{checkpoint}"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "model_ema.safetensors"} <= checkpoint_files(preempted / f"checkpoint-{checkpoint}")

    assert run_nodes(tmp_path, argv, "resumed") == [0, 0]
    assert logged_losses(preempted) == logged_losses(two)
    for weights in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(preempted / weights, two / weights)


SRUN_STEP = dict(SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="1", SLURM_STEP_NUM_NODES="1")  # what srun sets in its task


@pytest.mark.slow
def test_a_stop_signal_to_every_process_of_an_srun_step_saves_once_and_resumes_exactly(tmp_path, tiny_model, tiny_dataset):
    """A recipe's `launch` of two processes with two persistent data-loading workers each, under srun: SIGUSR1 reaches
    every process at once during step 3 (the launching shell, torchrun, the training processes and their workers, as
    slurmstepd delivers SLURM's warning). The launch does not pass it on a second time (torchrun, signalled again
    while it waits for its processes, would stop them with SIGTERM), the workers ignore it, and the run writes one
    complete checkpoint-3 (checkpoint-2 deleted after it is marked: no process exits before that) and exits 75. The
    same launch again resumes to the uninterrupted run's losses, weights and EMA, bit for bit."""
    flags = dict(max_steps=6, save_steps=2, save_total_limit=1, use_ema=True, ema_decay=0.9)
    flags.update(dataloader_num_workers=2, dataloader_persistent_workers=True)
    node = dict(NPROC_PER_NODE="2", NNODES="1", MASTER_ADDR="127.0.0.1", SIGNAL="SIGUSR1", **SRUN_STEP)

    def launch(output_dir: Path, name: str, **env) -> tuple[int, str]:
        argv = pretrain_args(tiny_model, tiny_dataset, output_dir, **flags)
        status = launch_node(tmp_path, argv, name, MASTER_PORT=str(free_port()), **node, **env).wait(timeout=300)
        return status, (tmp_path / f"{name}.log").read_text()

    reference = tmp_path / "uninterrupted"
    status, log = launch(reference, "whole", SIGNAL_AT="0")
    assert status == 0, log[-5000:]

    preempted, times = tmp_path / "preempted", tmp_path / "times"
    times.mkdir()
    status, log = launch(preempted, "preempted", SIGNAL_AT="3", SIGNAL_TREE="1", TIMES_DIR=str(times))
    assert status == PREEMPTED_EXIT_STATUS, log[-5000:]
    assert "killed by signal" not in log
    assert complete_checkpoints(preempted) == [3]
    assert [path.name for path in preempted.iterdir()] == ["checkpoint-3"]
    deleted = float((times / "deleted").read_text())
    assert all(float((times / f"exit-{rank}").read_text()) > deleted for rank in (0, 1))

    status, log = launch(preempted, "resumed", SIGNAL_AT="0")
    assert status == 0, log[-5000:]
    assert logged_losses(preempted) == logged_losses(reference)
    for weights in ("model.safetensors", "model_ema.safetensors"):
        assert_same_tensors(preempted / weights, reference / weights)


# Two processes find the checkpoint to resume from in argv[1]; process 1's listing lags (a network file system's
# cached view after a quick requeue) and lacks the newest folder. Each writes its choice to argv[2]/choice-RANK.
RESUME_CHOICE = """\
import os, pathlib, sys
import nepa.checkpoint
from nepa.args import NepaTrainingArguments
from nepa.trainer import resume_checkpoint

rank = os.environ["RANK"]
if rank == "1":
    listing = nepa.checkpoint.checkpoint_folders
    nepa.checkpoint.checkpoint_folders = lambda output_dir: listing(output_dir)[1:]
choice = resume_checkpoint(NepaTrainingArguments(output_dir=sys.argv[1], use_cpu=True))
pathlib.Path(sys.argv[2], f"choice-{rank}").write_text(str(choice))
"""


def test_every_process_resumes_from_the_checkpoint_process_0_chose(tmp_path):
    output_dir = tmp_path / "run"
    for step in (2, 4):
        (output_dir / f"checkpoint-{step}").mkdir(parents=True)
        (output_dir / f"checkpoint-{step}" / CHECKPOINT_COMPLETE).write_text(f"global_step {step}\n")
    script = tmp_path / "resume_choice.py"
    script.write_text(RESUME_CHOICE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, str(output_dir), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"choice-{rank}").read_text() == str(output_dir / "checkpoint-4")


COUNTING_STAND_IN = """\
#!/usr/bin/env bash
# Python for the recipe's arithmetic (-c); in place of training, a process that counts the SIGUSR1s it gets in the
# second after the first one, then exits 75.
if [ "$1" = -c ]; then exec {python} "$@"; fi
exec {python} -c 'import os, pathlib, signal, sys, time
received = []
signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
pathlib.Path("{ready}").write_text(str(os.getpid()))
while not received:
    time.sleep(0.01)
pathlib.Path("{ready}.received").touch()
time.sleep(1)
print("SIGUSR1 received", len(received), "times")
sys.exit(75)'
"""


@pytest.mark.parametrize("under_srun", [True, False], ids=["srun-signals-every-process", "by-hand-to-the-launcher"])
def test_the_launch_passes_a_stop_signal_on_once(under_srun, tmp_path):
    """Under srun, SIGUSR1 reaches the recipe's launch and the process it started alike, and the launch does not pass
    it on a second time; by hand, the launch alone gets it and passes it on. Either way the process gets it once,
    and the launch exits 75."""
    ready, stand_in = tmp_path / "ready", tmp_path / "python"
    stand_in.write_text(COUNTING_STAND_IN.format(python=sys.executable, ready=ready))
    stand_in.chmod(0o755)
    env = launch_environment(PYTHON=str(stand_in), NPROC_PER_NODE="1", **(SRUN_STEP if under_srun else {}))
    shell = f'source {REPO / "scripts" / "common.sh"}; launch train_pretrain.py'
    launch = subprocess.Popen(["bash", "-c", shell], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text():
        assert launch.poll() is None and time.monotonic() < deadline, launch.communicate()[0]
        time.sleep(0.05)
    if under_srun:  # the process first (two signals sent at once to one process may merge into one)
        os.kill(int(ready.read_text()), signal.SIGUSR1)
        while not Path(f"{ready}.received").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    launch.send_signal(signal.SIGUSR1)
    output = launch.communicate(timeout=60)[0]
    assert launch.returncode == PREEMPTED_EXIT_STATUS, output
    assert "SIGUSR1 received 1 times" in output


STAND_IN_TRAINING = """\
#!/usr/bin/env bash
# Python for the recipe's arithmetic (-c); in place of training, a process that exits 75 on SIGUSR1, as training does.
if [ "$1" = -c ]; then exec {python} "$@"; fi
exec {python} -c 'import pathlib, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
pathlib.Path("{ready}").touch()
time.sleep(120)'
"""


def test_the_sbatch_template_passes_the_warning_on_and_requeues(tmp_path):
    """SLURM's SIGUSR1 before the time limit reaches the batch script; it passes it to srun (here a stand-in that runs
    the task), the recipe's launch passes it to training, which exits 75, and the script requeues the job."""
    ready, requeued = tmp_path / "ready", tmp_path / "requeued"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "python": STAND_IN_TRAINING.format(python=sys.executable, ready=ready),
        "srun": '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',  # one task: this node's
        "scontrol": f'#!/usr/bin/env bash\necho "$@" > {requeued}\n',
    }
    for name, text in stand_ins.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = launch_environment(
        PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"), NPROC_PER_NODE="1", SLURM_JOB_ID="77",
        SLURM_NNODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="gpu1", TOTAL_BATCH="256", PER_DEVICE_BATCH="256",
    )
    command = ["bash", str(REPO / "scripts" / "slurm" / "run.sbatch"), "scripts/pretrain/nepa_b.sh"]
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    output = job.communicate(timeout=60)[0]
    assert job.returncode == PREEMPTED_EXIT_STATUS, output
    assert requeued.read_text().split() == ["requeue", "77"]
    assert "requeueing job 77" in output
