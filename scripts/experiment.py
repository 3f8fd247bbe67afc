"""What the experiment drivers under scripts/ share (the demo, the segmentation demo, the ablation tables): stages
that run once, and mean ± std over seeds.

A stage is one run of an entry point whose result file marks it done: running a driver again reuses every stage
whose result exists, so an interrupted experiment resumes where it stopped.
"""

import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Stages:
    """Runs each stage unless its result file exists (or `rerun`), and adds up the wall time of each kind of stage."""

    def __init__(self, rerun: bool = False):
        self.rerun = rerun
        self.seconds: dict[str, float] = {}

    def run(self, kind: str, result: Path, function, *args):
        """`function(*args)` unless `result` exists; what it returns, or None when the stage is reused."""
        if result.exists() and not self.rerun:
            print(f"reusing {result} ({kind})", flush=True)
            return None
        command = " ".join(map(str, args[0])) if len(args) == 1 and isinstance(args[0], list) else ""
        print(f"==> {kind}: {command}", flush=True)
        start = time.time()
        value = function(*args)
        self.add(kind, time.time() - start)
        print(f"<== {kind}: {(time.time() - start) / 60:.1f} min", flush=True)
        return value

    def add(self, kind: str, seconds: float) -> None:
        """Count `seconds` of a stage timed elsewhere (in a worker process) as `kind`."""
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """`mean ± std` of `values` times `scale` (100: accuracies in percentage points); one value alone; "-" for none."""
    values = [value * scale for value in values]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def provenance(script: str, argv: list[str] | None) -> dict:
    """What produced a results file: the commit checked out (with `+changes` when the tree differs from it) and the
    command line (`python SCRIPT ARGV`; `argv` None: the process's own arguments), so that a table printed from the
    file says which code measured it, however the driver was called."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    return {"commit": commit, "command": shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])}


def print_saved_table(results_file: str, table) -> dict:
    """A driver's `--table FILE`: the results it saved there, printed with its own `table` and returned."""
    results = json.loads(Path(results_file).read_text())
    print(table(results))
    return results
