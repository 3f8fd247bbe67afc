"""The non-finite loss guard of `NepaTrainer`: a NaN/inf loss never reaches the weights or a checkpoint, and the CPU
does not wait for the GPU to find out.

With a fused optimiser the guard skips a flagged step on the device by setting the optimiser's `found_inf`, the
tensor `torch.amp.GradScaler` hands fused Adam/AdamW: `Adam.step()` reads it with `getattr(self, "found_inf", None)`,
an attribute torch does not document. Checked on torch 2.14.1, whose `_fused_adam` hands it to the fused kernel
of every device: tests/test_training.py::test_fused_adamw_skips_its_update_when_found_inf_is_set runs the CPU
kernel (and the CUDA one where there is a GPU) and fails if a torch upgrade stops honouring it.
"""

import json
import logging
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .checkpoint import checkpoint_folder, last_complete_checkpoint

logger = logging.getLogger(__name__)

SKIPPED_STEPS_NAME = "skipped_steps.json"  # in a checkpoint: the non-finite steps skipped so far, when any


class NonFiniteLossError(RuntimeError):
    pass


def fused_optimizer(optimizer) -> torch.optim.Optimizer | None:
    """The torch optimiser behind the Trainer's (accelerate wraps it) if it is a fused one, which honours a
    `found_inf` tensor by skipping its update on the device, as it does for `torch.amp.GradScaler`."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if inner.defaults.get("fused") else None


class HostCopy:
    """A scalar on the device, copied to the host when the device's stream reaches this point. `item()` then waits for
    that point only; the tensor's own `.item()` would wait for all the work queued after it too (the next step's)."""

    def __init__(self, tensor: torch.Tensor):
        self.host, self.ready = tensor, None  # the CPU computes synchronously: nothing to wait for
        if tensor.is_cuda:
            self.host = torch.empty((), dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def item(self) -> float:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.item()


class NonFiniteLossGuard(TrainerCallback):
    """Keeps a NaN/inf loss from reaching the weights without making the CPU wait for the GPU every micro-step.

    Each micro-step adds its count of non-finite losses to a tensor on the device (`observe`). Before the optimiser
    step the count is summed across processes on the device (DDP has already spread one process's NaN gradients to
    all, so all must decide alike) into a flag, and then:
    - a fused optimiser (`adamw_torch_fused`, the Trainer's default AdamW) gets the flag as `found_inf` and skips
      the step's update on the device; the flag is read later (`settle`), once the GPU has long computed it: at the
      next optimiser step, the next log line, before a checkpoint is marked complete, and at the end of training;
    - any other optimiser needs the flag on the host at once (one read per optimiser step); a flagged step's
      gradients are dropped, and AdamW leaves parameters without gradients and their state untouched.
    A flagged step stops the run with `NonFiniteLossError`, or, with `skip_nonfinite_loss`, counts in
    `skipped_steps` (saved with each checkpoint, so a resumed run goes on counting) and training goes on; its forward
    passes may have written NaN into buffers (BatchNorm running statistics), so with `skip_nonfinite_loss` the
    buffers are copied at the start of every step and a flagged step's are restored from that copy, on the device."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.count: torch.Tensor | None = None  # non-finite losses since the last optimiser step, on the device
        self.pending: tuple[int, HostCopy] | None = None  # (step, flag) not read yet
        self.skipped_steps = 0
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, its value at the step's start)

    def on_step_begin(self, args, state, control, **kwargs):
        if args.skip_nonfinite_loss:
            self.buffers = [(buffer, buffer.clone()) for buffer in self.trainer.model.buffers()]

    def observe(self, loss: torch.Tensor) -> None:
        nonfinite = (~torch.isfinite(loss.detach())).sum()
        self.count = nonfinite if self.count is None else self.count + nonfinite

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.settle(args)
        count, self.count = self.count, None
        if count is None:
            return
        if args.world_size > 1:
            count = self.trainer.accelerator.reduce(count, reduction="sum")
        flag = (count > 0).float()
        self.pending = (state.global_step + 1, HostCopy(flag))
        for buffer, start in self.buffers:
            buffer.copy_(torch.where(flag > 0, start, buffer))
        optimizer = fused_optimizer(self.trainer.optimizer)
        if optimizer is not None:
            optimizer.found_inf = flag
        elif self.settle(args):
            self.trainer.model.zero_grad(set_to_none=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        optimizer = fused_optimizer(self.trainer.optimizer)
        if optimizer is not None and hasattr(optimizer, "found_inf"):
            del optimizer.found_inf  # this step's flag only

    def on_save(self, args, state, control, **kwargs):
        self.settle(args)  # before `CheckpointCompletion.on_save` marks the checkpoint complete
        if args.should_save and self.skipped_steps:
            folder = checkpoint_folder(args.output_dir, state.global_step)
            (folder / SKIPPED_STEPS_NAME).write_text(json.dumps({"skipped_steps": self.skipped_steps}) + "\n")

    def load(self, checkpoint: str) -> None:
        """The skipped-step count of a checkpoint being resumed."""
        path = Path(checkpoint, SKIPPED_STEPS_NAME)
        self.skipped_steps = json.loads(path.read_text())["skipped_steps"] if path.is_file() else 0

    def on_train_end(self, args, state, control, **kwargs):
        self.settle(args)

    def settle(self, args) -> bool:
        """Read the pending flag, if any: stop the run, or count the dropped step (True)."""
        if self.pending is None:
            return False
        (step, flag), self.pending = self.pending, None
        if not flag.item():
            return False
        if not args.skip_nonfinite_loss:
            checkpoint = last_complete_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (in at least one process): stopped, and its optimiser step was not "
                f"applied, so no NaN reached the weights. The last good checkpoint is {checkpoint}. "
                f"Lower the learning rate or use bf16 instead of fp16; --skip_nonfinite_loss True drops such steps."
            )
        logger.warning("non-finite loss at step %d: dropped this step's update.", step)
        self.skipped_steps += 1
        return True
