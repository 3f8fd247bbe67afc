"""Checkpoints for runs that a cluster may stop: on a warning signal, and every few minutes.

SIGTERM or SIGUSR1 (a scheduler's warning before it stops or requeues a job) in any process: every process
finishes the optimiser step it is in (and the evaluation due at that step, if any), the run writes a complete
checkpoint (model, optimiser, scheduler, RNG of every process, data position, EMA) and exits with
`PREEMPTED_EXIT_STATUS`, which `scripts/slurm/` answers by requeueing the job; the rerun resumes from that
checkpoint. Data-loading workers ignore both signals, but for their own training process's SIGTERM
(`WorkerIgnoresStopSignals`): a scheduler signals every process of a job, and torchrun passes its own stop on to
each process's whole process group, workers included; a worker that died of it would fail the training process
mid-step or mid-save. `--save_every_minutes` also
writes a checkpoint when that long has passed since the last one, so a stop without warning loses at most that
much work.
"""

import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionCheckpoints(TrainerCallback):
    """After each optimiser step, the processes agree (a max over a two-flag tensor) on whether any of them got a stop
    signal and whether process 0's clock says a timed checkpoint is due; then all save, and after a stop signal all
    exit once the checkpoint is marked complete. Registered after the callback that writes the marker.

    The agreement runs on the CPU (gloo), so the step does not wait for the GPU's queue to drain. Data-loading worker
    processes forked after training starts inherit the handler, so SIGUSR1 sent to every process of a job step (srun
    passes signals on that way) leaves them running. SIGTERM does not: torch's workers exit on it, so a SIGTERM to
    every process (scancel without --signal) may stop the run with a DataLoader error before it saves; the timed
    checkpoints bound what that loses, and scripts/slurm/ warns with SIGUSR1."""

    def __init__(self, save_every_minutes: float | None):
        self.interval = None if save_every_minutes is None else 60 * save_every_minutes
        self.received: int | None = None  # the stop signal, once one arrived
        self.stopping = False
        self.last_save = time.monotonic()
        self.agree = False  # several processes: agree on the flags
        self.group = None  # their CPU group; None: the default one (already gloo)
        self.previous_handlers = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()
        for signum in STOP_SIGNALS:
            self.previous_handlers[signum] = signal.signal(signum, self.receive)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.agree = True
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def receive(self, signum, frame) -> None:
        if self.received is None:
            logger.warning("%s: finishing this optimiser step, then saving a checkpoint and exiting.", signal.Signals(signum).name)
        self.received = signum

    def on_step_end(self, args, state, control, **kwargs):
        due = self.interval is not None and args.process_index == 0 and time.monotonic() - self.last_save >= self.interval
        flags = torch.tensor([self.received is not None, due], dtype=torch.int32)
        if self.agree:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        stop, due = flags.tolist()
        if stop or due:
            control.should_save = True
        if stop:
            self.stopping = True
            # The epoch's evaluation would come after this step's save and exit: run it now, before the save.
            if args.eval_strategy == IntervalStrategy.EPOCH and float(state.epoch).is_integer():
                control.should_evaluate = True

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()
        if self.stopping:
            logger.warning(
                "checkpoint-%d is complete; exiting with status %d so that the job is requeued and resumes from it.",
                state.global_step,
                PREEMPTED_EXIT_STATUS,
            )
            raise SystemExit(PREEMPTED_EXIT_STATUS)

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}


class WorkerIgnoresStopSignals:
    """A DataLoader `worker_init_fn` that makes the worker ignore the stop signals, then runs `then` (the loader's
    own, if any). SIGUSR1 is ignored outright. SIGTERM still ends the worker when its own training process sends
    it (multiprocessing stops its workers that way when the process exits): the signal is blocked, and a thread
    takes each one and ends the worker only when it comes from the parent process. (torch's own handler, which
    the block bypasses, ends the worker on any SIGTERM: quietly on its parent's, killed by it on another's.) Only
    the worker's first thread exists here, and the threads it starts later keep the block."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=self.end_on_parents_sigterm, args=(os.getppid(),), daemon=True).start()
        if self.then is not None:
            self.then(worker_id)

    @staticmethod
    def end_on_parents_sigterm(parent: int) -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)
