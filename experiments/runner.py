"""The one runner of the studies under experiments/: stages that run once and are timed, an entry point run in this
process or in a process of its own with its output kept in a log, the CPU flags every stage passes, the dataset the
stages read, their results, mean ± std over seeds, and what produced a results file.

A stage is one run of an entry point whose result file marks it done: running a study again reuses every stage
whose result exists, so an interrupted study resumes where it stopped.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments import miniature

REPO = Path(__file__).resolve().parents[1]
# What every stage of a study passes to an entry point, whatever its device: no logging service, no loader worker
# processes. CPU_FLAGS adds the CPU, the miniature's device (`device_flags`: a GPU when torch sees one).
STAGE_FLAGS = ["--report_to", "none", "--dataloader_num_workers", "0"]
CPU_FLAGS = ["--use_cpu", "True", *STAGE_FLAGS]
# The in-memory fast path (docs/usage.md): the crops of a batch take one call in the training process.
IN_MEMORY = ["--images_in_memory", "True"]
WALL_SECONDS = "wall_seconds.txt"  # a stage's wall time, beside its result (with Stages(keep_times=True))


class Stages:
    """Runs each stage unless its result file exists (or `rerun`), and adds up the wall time of each kind of stage;
    with `keep_times`, also leaves each stage's wall time beside its result, so that a later run (or another
    process) can add up the time of stages it reuses (`stage_seconds`)."""

    def __init__(self, rerun: bool = False, keep_times: bool = False):
        self.rerun, self.keep_times = rerun, keep_times
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def run(self, kind: str, result: Path, function, *args):
        """`function(*args)` unless `result` exists; what it returns, or None when the stage is reused."""
        if result.exists() and not self.rerun:
            print(f"reusing {result} ({kind})", flush=True)
            return None
        command = " ".join(map(str, args[0])) if args and isinstance(args[0], list) else ""
        print(f"==> {kind}: {command}", flush=True)
        start = time.time()
        value = function(*args)
        seconds = time.time() - start
        self.add(kind, seconds)
        if self.keep_times:
            (result.parent / WALL_SECONDS).write_text(f"{seconds:.3f}\n")
        print(f"<== {kind}: {seconds / 60:.1f} min", flush=True)
        return value

    def run_side_by_side(self, jobs: int, stages: list[tuple]) -> list:
        """`run(*stage)` for each of `stages`, `jobs` at a time: stages that run in processes of their own
        (`run_entry_point`), which is what lets them run side by side."""
        if jobs == 1:
            return [self.run(*stage) for stage in stages]
        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(lambda stage: self.run(*stage), stages))

    def add(self, kind: str, seconds: float) -> None:
        """Count `seconds` of a stage as `kind`."""
        with self._lock:
            self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds


class StageFailed(RuntimeError):
    """An entry point run by `run_entry_point` exited with an error; the message ends with its last error line."""


def run_entry_point(argv: list[str], log: Path, threads: int | None = None, echo: bool = True) -> None:
    """`python ARGV` (argv[0]: an entry point such as train_pretrain.py) in a process of its own, from the repository
    root, with `threads` torch threads (None: torch's choice); its output is kept in `log` and, with `echo`, shown
    live (tqdm included). Raises StageFailed on an error exit."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *argv]
    with open(log, "wb") as output, subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        for chunk in iter(lambda: process.stdout.read1(4096), b""):
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            output.write(chunk)
    if process.returncode != 0:
        lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line]
        raise StageFailed(f"exit {process.returncode}: {(errors or lines or ['no output'])[-1][:300]}")


def device_flags() -> list[str]:
    """CPU_FLAGS, less `--use_cpu` when torch sees a GPU."""
    import torch

    return STAGE_FLAGS if torch.cuda.is_available() else CPU_FLAGS


def add_threads_flag(parser) -> None:
    """A study's --threads (see `use_threads`)."""
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: torch's choice, all cores); on a CPU shared with other work, 1 can be faster",
    )  # fmt: skip


def add_finetune_steps_flag(parser, defaults: dict[float, int] | None = None) -> None:
    """A study's --finetune_steps: one step budget for every fine-tune, or one per labelled fraction, instead of the
    study's per fraction (`defaults`, or the miniature's protocol)."""
    parser.add_argument(
        "--finetune_steps", type=int, nargs="+", default=None,
        help=f"steps of every fine-tune, or one value per labelled fraction (default: per fraction, {defaults or miniature.FINETUNE_STEPS})",
    )  # fmt: skip


def finetune_budget(finetune_steps: list[int] | None, percents, defaults: dict[float, int] | None = None) -> dict[float, int]:
    """Steps of the fine-tune on each of `percents` % of the labels, from --finetune_steps, else from `defaults` (the
    miniature's protocol when None); ValueError: no budget."""
    if finetune_steps is None:
        defaults = defaults or miniature.FINETUNE_STEPS
        unknown = [percent for percent in percents if percent not in defaults]
        if unknown:
            raise ValueError(f"no step budget for {unknown} % of the labels: pass --finetune_steps, or use {list(defaults)}.")
        return {percent: defaults[percent] for percent in percents}
    if len(finetune_steps) == 1:
        return {percent: finetune_steps[0] for percent in percents}
    if len(finetune_steps) != len(percents):
        raise ValueError(f"--finetune_steps takes one value, or one per labelled fraction ({len(percents)}); got {len(finetune_steps)}.")
    return dict(zip(percents, finetune_steps))


def check_finetune_budget(parser, finetune_steps: list[int] | None, percents, defaults: dict[float, int] | None = None) -> None:
    """`finetune_budget` at a study's parse time, its error the parser's: a bad --finetune_steps stops the study
    before its first stage, not after its pretraining."""
    try:
        finetune_budget(finetune_steps, percents, defaults)
    except ValueError as error:
        parser.error(str(error))


def use_threads(threads: int | None) -> None:
    """Run this process's torch on `threads` threads (None: torch's choice)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def ensure_dataset(path: str | Path, stages: Stages, flag: str = "--dataset") -> str:
    """The absolute path of the download_dataset.py folder `path` (relative to the repository): the miniature's
    Fashion-MNIST (miniature.DATASET) is built there when it is missing; any other missing folder is refused."""
    folder = (REPO / path).resolve()
    if (folder / "dataset_dict.json").is_file():
        return str(folder)
    if folder != (REPO / miniature.DATASET).resolve():
        raise SystemExit(
            f"{flag} {path} does not exist: build it with `python download_dataset.py --dataset fashion-mnist "
            f"--output_dir {path}` (or give a folder download_dataset.py wrote)."
        )
    import download_dataset

    argv = ["--dataset", "fashion-mnist", "--output_dir", str(folder)]
    stages.run("dataset", folder / "dataset_dict.json", download_dataset.main, argv)
    return str(folder)


def pretraining_checkpoint(pretrain: Path, step: int) -> Path | None:
    """The `checkpoint-<step>` folder of the pretraining in `pretrain` once it is whole (None before), with the image
    processor of the miniature's config, which the Trainer's checkpoints leave out."""
    import shutil

    from nepa.checkpoint import checkpoint_folder

    folder = checkpoint_folder(pretrain, step)
    if not (folder / "trainer_state.json").exists():  # written after the weights: the checkpoint is whole
        return None
    if not (folder / "preprocessor_config.json").exists():
        shutil.copy(REPO / miniature.PRETRAIN_CONFIG / "preprocessor_config.json", folder)
    return folder


def read_json(path: Path) -> dict | None:
    """A stage's JSON result, None when it has none (yet)."""
    return json.loads(path.read_text()) if path.exists() else None


def accuracy(folder: Path) -> float:
    """The top-1 of a probe's or fine-tune's output folder (its eval_results.json)."""
    return json.loads((folder / "eval_results.json").read_text())["eval_accuracy"]


def stage_seconds(folder: Path) -> float:
    """Wall seconds of the stages under `folder` (those run with Stages(keep_times=True))."""
    return sum(float(path.read_text()) for path in folder.rglob(WALL_SECONDS))


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """`mean ± std` of `values` times `scale` (100: accuracies in percentage points); one value alone; "-" for none."""
    values = [value * scale for value in values]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def provenance(module: str, argv: list[str] | None) -> dict:
    """What produced a results file: the commit checked out (with `+changes` when the tree differs from it) and the
    command line (`python -m MODULE ARGV`; `argv` None: the process's own arguments), so that a table printed from
    the file says which code measured it, however the study was called."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    return {"commit": commit, "command": shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])}


def print_saved_table(results_file: str, table) -> dict:
    """A study's `--table FILE`: the results it saved there, printed with its own `table` and returned."""
    results = json.loads(Path(results_file).read_text())
    print(table(results))
    return results
