"""The `Trainer` behaviour both training scripts share.

- optimiser parameter groups from `parameter_groups()` (subclasses choose the grouping);
- an EMA of the weights (on unless `--use_ema False`): updated every step, evaluated beside the raw weights
  (`eval_ema_*` metrics), saved as `model_ema.safetensors` with every checkpoint, restored on resume, and
  reloaded with the best checkpoint's weights under `--load_best_model_at_end`;
- a non-finite loss (in any process) stops the run without applying that optimiser step (or, with
  `skip_nonfinite_loss`, drops the step's update in every process), so NaN never reaches the weights or a
  checkpoint; it is counted on the device, and the CPU never waits for it per micro-step, nor, with a fused
  optimiser (Transformers' default AdamW), per optimiser step (`nepa/nonfinite.py`);
- checkpoints get a `checkpoint_complete` marker once every process has written its part; resuming picks the
  newest marked one, as process 0 sees the folder; `--save_total_limit` deletes old checkpoints only after the
  new one is marked, and every process waits for that before going on (or exiting);
- a checkpoint whose write fails in any process (a full disk, a quota, an I/O error) stops every process with
  one `CheckpointWriteError` that says why and what a rerun resumes from; it is removed, never marked; a
  warning comes before a save when less space is free than the previous checkpoint took;
- a stop signal (SIGTERM / SIGUSR1) saves a checkpoint after the current optimiser step and exits to be requeued,
  and `--save_every_minutes` adds timed checkpoints (`nepa/preemption.py`); data-loading workers ignore those
  signals;
- every process draws its own random stream (batch augmentation, drop path), seeded from the pair (seed, rank);
- the training dataset learns the epoch (`set_epoch`), which seeds each image's augmentation;
- uint8 batches are normalised (and, in training, augmented) on the device, in `compute_loss`;
- per-step scalars recorded with `record()` are averaged into each logging line, beside the training
  throughput since the previous line (`images_per_second`, all processes together).

It overrides public `Trainer` methods and callback hooks, and wraps one private method, `_save_checkpoint`, the only
place where every process writes its part of a checkpoint: a failure there must reach every process.
"""

import copy
import logging
import os
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer import TRAINING_ARGS_NAME

from .checkpoint import (
    CHECKPOINT_COMPLETE,
    CheckpointWriteError,
    checkpoint_folder,
    checkpoint_folders,
    checkpoint_step,
    chosen_by_process_zero,
    last_complete_checkpoint,
    warn_when_short_of_space,
    write_failure_message,
)
from .data import BatchAugment, BatchNormalize, collate_images
from .ema import EMA_WEIGHTS_NAME, ModelEMA
from .nonfinite import NonFiniteLossGuard
from .optim import pretraining_param_groups
from .preemption import PreemptionCheckpoints, WorkerIgnoresStopSignals

logger = logging.getLogger(__name__)


def delete_old_checkpoints(output_dir: str, newest: Path, keep: int, best: str | None) -> None:
    """Keep `newest` (just marked complete), the `keep - 1` newest complete checkpoints before it and the best one;
    delete the other, older ones (half-written ones included). It runs only once `newest` is marked: the Trainer's
    own rotation deletes inside its save, before the marker, so a kill there could leave no complete checkpoint."""
    older = [path for path in checkpoint_folders(output_dir) if checkpoint_step(path) < checkpoint_step(newest)]
    kept = [path for path in older if (path / CHECKPOINT_COMPLETE).is_file()][: keep - 1]
    for path in older:
        if path not in kept and not (best and path.resolve() == Path(best).resolve()):
            shutil.rmtree(path, ignore_errors=True)


def resume_checkpoint(args) -> str | None:
    """`--resume_from_checkpoint` when given, else the newest complete checkpoint in `output_dir`, as process 0
    finds it: every process resumes from the same one."""
    return chosen_by_process_zero(lambda: choose_resume_checkpoint(args))


def choose_resume_checkpoint(args) -> str | None:
    if args.resume_from_checkpoint:
        folder = Path(args.resume_from_checkpoint)
        if not folder.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {folder} is not a directory.")
        if not (folder / CHECKPOINT_COMPLETE).is_file():
            newest = last_complete_checkpoint(folder.parent)
            raise ValueError(
                f"--resume_from_checkpoint {folder} has no {CHECKPOINT_COMPLETE} marker, so its writing was "
                f"interrupted (a killed run?). The newest complete checkpoint beside it is {newest}."
            )
        return args.resume_from_checkpoint
    if not Path(args.output_dir).is_dir():
        return None
    checkpoint = last_complete_checkpoint(args.output_dir)
    if checkpoint:
        logger.warning("Resuming from %s (the newest complete checkpoint in %s).", checkpoint, args.output_dir)
    return checkpoint


def seed_process(seed: int, rank: int) -> None:
    """Seed this process's `random`, numpy and torch streams from the pair (seed, rank): rank 0 exactly as
    `set_seed(seed)`, rank r > 0 from numpy's `SeedSequence(seed, spawn_key=(r,))`, which hashes the pair. Unlike
    `seed + rank` (seed s on rank 1 was seed s + 1 on rank 0), no two pairs share a stream but by a hash collision,
    about 2**-32 for torch's CPU generator, which keeps 32 bits of its seed."""
    if rank == 0:
        set_seed(seed)
        return
    words = [int(word) for word in np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(6)]
    random.seed(words[0] << 32 | words[1])
    np.random.seed(words[2:4])
    torch.manual_seed(words[4] << 32 | words[5])  # and every accelerator's generator


def set_up_workers(loader, seed: int):
    """A loader whose data-loading workers outlive stop signals (`WorkerIgnoresStopSignals`) and, when persistent,
    draw their base seed from a generator of their own: persistent workers' one iterator is made when the loader is
    first used, which in a resumed run is another point of the process's random stream than in an uninterrupted one,
    and a draw from that stream would shift drop path and RoPE augmentation from then on. What the workers draw
    does not shape the batches: each image's augmentation is seeded by (seed, epoch, index)."""
    inner = getattr(loader, "base_dataloader", loader)  # the DataLoader inside accelerate's prepared one
    if not isinstance(inner.worker_init_fn, WorkerIgnoresStopSignals):  # a persistent loader comes back: once
        inner.worker_init_fn = WorkerIgnoresStopSignals(inner.worker_init_fn)
    if inner.persistent_workers and inner.generator is None:
        inner.generator = torch.Generator().manual_seed(seed)
    return loader


class NepaCallback(TrainerCallback):
    """A callback that acts on its `NepaTrainer`."""

    def __init__(self, trainer: "NepaTrainer"):
        self.trainer = trainer


class ThroughputClock(NepaCallback):
    """Starts the clock of the logged `images_per_second` when training begins (or resumes)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.last_log = (time.perf_counter(), state.global_step)


class EmaUpdate(NepaCallback):
    """Moves the EMA of the weights after every optimiser step."""

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.ema is not None:
            self.trainer.ema.update()


class DatasetEpoch(NepaCallback):
    """Tells the training dataset each epoch as it begins, for its per-epoch augmentation draws. accelerate forwards
    the epoch only for some sampler layouts (not under several processes, nor in the epoch a run resumes in);
    `state.epoch` is the resumed one's, e.g. 2.5 -> 2."""

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.trainer.train_dataset, "set_epoch"):
            self.trainer.train_dataset.set_epoch(int(state.epoch))


class CheckpointCompletion(NepaCallback):
    """Once every process has written checkpoint-N, marks it complete (`CHECKPOINT_COMPLETE`) and then deletes the old
    checkpoints beyond the trainer's `save_total_limit`: a checkpoint is deleted only after a newer one is complete."""

    def on_save(self, args, state, control, **kwargs):
        # The Trainer has written checkpoint-N (and, through `save_model`, the EMA) and called this in every process.
        self.trainer.accelerator.wait_for_everyone()  # every process has written its RNG state
        if args.should_save:
            folder = checkpoint_folder(args.output_dir, state.global_step)
            (folder / CHECKPOINT_COMPLETE).write_text(f"global_step {state.global_step}\n")
            if self.trainer.save_total_limit:
                delete_old_checkpoints(args.output_dir, folder, self.trainer.save_total_limit, state.best_model_checkpoint)
        # No process goes on (or exits after a stop signal, which makes torchrun stop the others) before the marker
        # is written and old checkpoints are deleted.
        self.trainer.accelerator.wait_for_everyone()


class NepaTrainer(Trainer):
    """Expects `NepaTrainingArguments` (`use_ema`, `ema_decay`, `skip_nonfinite_loss`) and batches of uint8
    pixels, which it normalises on the device (and augments with `batch_augment` in training).

    One optimiser step, in the order `Trainer` runs it (transformers 5.23, `Trainer._run_epoch`), and where each
    part lives:

    1. step begins: `NonFiniteLossGuard.on_step_begin` copies the model's buffers (with `--skip_nonfinite_loss`);
    2. for each of the `--gradient_accumulation_steps` micro-batches, `training_step`:
       a. prepare the batch: `compute_loss` -> `prepare_batch` (normalise, `batch_augment`);
       b. forward and loss: `compute_loss` (`Trainer.compute_loss`, or a subclass's: NEPA's, segmentation's);
       c. backward: `Trainer.training_step`;
       d. non-finite count: `NonFiniteLossGuard.observe`, added up on the device;
    3. clip the gradients to `--max_grad_norm`: `Trainer`;
    4. step or skip: `NonFiniteLossGuard.on_pre_optimizer_step` sums the count over processes and flags the step
       (a fused optimiser skips it on the device through `found_inf`; another's gradients are dropped), then the
       optimiser steps, and `on_optimizer_step` clears the flag; the scheduler steps and the gradients are zeroed;
    5. EMA: `EmaUpdate.on_step_end` updates it (`nepa.ema.ModelEMA`);
    6. stop signal or timed checkpoint: `PreemptionCheckpoints.on_step_end` asks for a save (`nepa.preemption`);
    7. log: `log` adds the `record()`ed scalars, the skipped-step count and `images_per_second`; the guard reads
       its flag here at the latest;
    8. evaluate: `evaluate`, and again with the EMA's weights (pretraining adds the k-NN monitor,
       `train_pretrain.NepaPretrainer.evaluate`, whose `MonitorSchedule` asks for this every --knn_eval_steps);
    9. save: `Trainer` writes checkpoint-N (`save_model` adds the EMA), and `_save_checkpoint` stops every process
       if any write failed; then, in callback order, the guard (`skipped_steps.json`), `CheckpointCompletion.on_save`
       (marker, old checkpoints deleted, every process waits) and `PreemptionCheckpoints` (exit after a stop
       signal).
    """

    def __init__(self, *args, normalize: BatchNormalize, batch_augment: BatchAugment | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # What the command line asked for, saved as training_args.bin: below (and in ProbeTrainer), a Trainer setting
        # is switched off where this class does the work its own way, which the arguments must not show as the run's.
        self.given_args = copy.deepcopy(self.args)
        # The Trainer seeded every process alike, so every rank would draw the same mixup / cutmix lambda and box,
        # erasing rectangles and drop-path masks. Give each its own stream (process 0 keeps the seed); checkpoints
        # keep each process's RNG state, so a resumed run continues every stream exactly.
        seed_process(self.args.seed, self.args.process_index)
        # Old checkpoints are deleted here once the new one is marked complete (`delete_old_checkpoints`), not by the
        # Trainer, which deletes them before.
        self.save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        self.normalize = normalize
        self.batch_augment = batch_augment
        self.ema = ModelEMA(self.model, self.args.ema_decay) if self.args.use_ema else None
        self.nonfinite_guard = NonFiniteLossGuard(self)
        self.write_failure: Exception | None = None  # the model's write, within a checkpoint's (`_save_checkpoint`)
        self.writing_checkpoint = False
        self.last_log: tuple[float, int] | None = None  # (time, global step) of the last training log line
        self._recorded: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.add_callback(self.nonfinite_guard)
        for callback in (ThroughputClock, EmaUpdate, DatasetEpoch, CheckpointCompletion):
            self.add_callback(callback(self))
        self.add_callback(PreemptionCheckpoints(self.args.save_every_minutes))  # after CheckpointCompletion marks checkpoints

    # --- optimisation ---------------------------------------------------------------------------

    def parameter_groups(self, model: torch.nn.Module) -> list[dict]:
        return pretraining_param_groups(model, self.args.weight_decay)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(self.parameter_groups(model), **optimizer_kwargs)
        return self.optimizer

    def prepare_batch(self, inputs: dict) -> dict:
        """The model's inputs from a collated batch (already on the device): pixels normalised and, in training,
        augmented with `batch_augment` (which may change the labels and drop an image)."""
        inputs = {**inputs, "pixel_values": self.normalize(inputs["pixel_values"])}
        if self.batch_augment is not None and self.model.training:  # training_step calls model.train() first
            inputs["pixel_values"], inputs["labels"] = self.batch_augment(inputs["pixel_values"], inputs["labels"])
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, self.prepare_batch(inputs), return_outputs, num_items_in_batch)

    def forward_without_grad(self, model, inputs: dict):
        """The model's outputs on a batch, without gradients: the `prediction_step` of models that take no labels."""
        with torch.no_grad(), self.compute_loss_context_manager():
            return model(pixel_values=self.prepare_batch(inputs)["pixel_values"])

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.observe(loss)
        return loss

    # --- data: workers that outlive a stop signal and a resume ----------------------------------

    def get_train_dataloader(self):
        return set_up_workers(super().get_train_dataloader(), self.args.seed)

    # --- logging --------------------------------------------------------------------------------

    def record(self, name: str, value: torch.Tensor) -> None:
        """Add a per-step scalar; its mean since the last log appears in the next logging line."""
        self._recorded[name].append(value.detach().float())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for name, values in self._recorded.items():
                logs[name] = round(torch.stack(values).mean().item(), 6)
            self._recorded.clear()
            self.nonfinite_guard.settle(self.args)
            if self.nonfinite_guard.skipped_steps:
                logs["skipped_steps"] = self.nonfinite_guard.skipped_steps
            now, step = time.perf_counter(), self.state.global_step
            if self.last_log is not None and step > self.last_log[1]:
                images = (step - self.last_log[1]) * self.args.train_batch_size
                images *= self.args.gradient_accumulation_steps * self.args.world_size
                logs["images_per_second"] = round(images / (now - self.last_log[0]), 1)
            self.last_log = (now, step)
        super().log(logs, start_time)

    # --- evaluation -----------------------------------------------------------------------------

    def get_eval_dataloader(self, eval_dataset=None):
        """The Trainer's evaluation loader, which never drops a last short batch: `--dataloader_drop_last` is for
        training (equal steps), but the Trainer applies it to evaluation too, which would score 49,152 of
        ImageNet's 50,000 validation images at a global batch of 1024. Under several processes accelerate repeats
        images to even the last batches and `gather_for_metrics` drops the repeats: every image counts once. Its
        workers outlive stop signals, as the training loader's do."""
        drop_last, self.args.dataloader_drop_last = self.args.dataloader_drop_last, False
        try:
            return set_up_workers(super().get_eval_dataloader(eval_dataset), self.args.seed)
        finally:
            self.args.dataloader_drop_last = drop_last

    # --- EMA: evaluation, saving, resuming ------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.ema is not None:
            with self.ema.applied():
                metrics.update(super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_ema"))
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        try:
            super().save_model(output_dir, _internal_call)
            if self.args.should_save:
                self.save_beside_model(output_dir or self.args.output_dir)
        except Exception as error:
            if not self.writing_checkpoint:
                raise
            # Within a checkpoint the Trainer may wait for every process after the model's write: keep going to
            # that barrier, and report the failure with the others' once the checkpoint's writes are done.
            self.write_failure = error

    def save_beside_model(self, folder: str) -> None:
        """Files saved with the model's weights (in process 0): the arguments as given (the Trainer's own copy holds
        its internal settings), and the EMA."""
        torch.save(self.given_args, os.path.join(folder, TRAINING_ARGS_NAME))
        if self.ema is not None:
            self.ema.save(os.path.join(folder, EMA_WEIGHTS_NAME))

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint`, and, when any process's write failed, the removal of the incomplete folder
        and one `CheckpointWriteError` (process 0's; the others exit with status 1 without repeating it)."""
        if self.args.process_index == 0:
            warn_when_short_of_space(self.args.output_dir)
        self.writing_checkpoint, self.write_failure = True, None
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            self.write_failure = self.write_failure or error
        finally:
            self.writing_checkpoint = False
        failure = None if self.write_failure is None else f"{type(self.write_failure).__name__}: {self.write_failure}"
        failures = [failure]
        if self.args.world_size > 1:
            failures = [None] * self.args.world_size
            dist.all_gather_object(failures, failure)
        failures = {rank: error for rank, error in enumerate(failures) if error is not None}
        if not failures:
            return
        folder = checkpoint_folder(self.args.output_dir, self.state.global_step)
        if self.args.process_index != 0:
            raise SystemExit(1)
        shutil.rmtree(folder, ignore_errors=True)
        raise CheckpointWriteError(write_failure_message(folder, failures)) from self.write_failure

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """`Trainer.train`, which also restores the EMA when resuming (the Trainer restores the rest) and, under
        `load_best_model_at_end`, loads the best checkpoint's EMA beside its weights."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = chosen_by_process_zero(lambda: last_complete_checkpoint(self.args.output_dir))
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete checkpoint.")
        if self.ema is not None and resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, EMA_WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{resume_from_checkpoint} has no {EMA_WEIGHTS_NAME}: it was written without EMA. "
                    f"Resume with --use_ema False, or start a new output_dir."
                )
            self.ema.load(path)
        if resume_from_checkpoint:
            self.nonfinite_guard.load(resume_from_checkpoint)
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.ema is not None and self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            # The Trainer has reloaded the best checkpoint's weights only; its EMA goes with them, so that the final
            # evaluation and the saved folder describe that one checkpoint.
            self.ema.load(os.path.join(self.state.best_model_checkpoint, EMA_WEIGHTS_NAME))
        return result


def image_inputs(processor, train_dataset=None, eval_dataset=None, data_collator=collate_images) -> dict:
    """The `NepaTrainer` arguments every entry point passes: its datasets, uint8 collation, the processor's normalisation."""
    normalize = BatchNormalize(processor.image_mean, processor.image_std)
    return dict(train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=data_collator, normalize=normalize)


def use_saved_ema(trainer: NepaTrainer, weights_folder: str | None) -> None:
    """Evaluation without training: the EMA to evaluate is the one saved beside the loaded weights
    (`weights_folder`/model_ema.safetensors); without one there is none, and no `eval_ema_*` metrics."""
    if trainer.ema is None:
        return
    path = os.path.join(weights_folder, EMA_WEIGHTS_NAME) if weights_folder else None
    if path and os.path.isfile(path):
        trainer.ema.load(path)
        return
    logger.warning("%s holds no %s: evaluating the weights only, without eval_ema_* metrics.", weights_folder, EMA_WEIGHTS_NAME)
    trainer.ema = None


def train_and_evaluate(trainer: Trainer, processor, checkpoint: str | None, weights_folder: str | None) -> dict:
    """What every training script ends with: train (resuming from `checkpoint`), save the model, its image
    processor and the state, evaluate, and print / save the metrics the Trainer's way. `weights_folder` is the
    folder the model's weights were loaded from (None: initialised at random); evaluated without training, its
    saved EMA is evaluated beside them."""
    args, metrics = trainer.args, {}
    if args.do_eval and not args.do_train:
        use_saved_ema(trainer, weights_folder)
    if args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        if args.should_save:
            processor.save_pretrained(args.output_dir)
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if args.do_eval:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    return metrics
