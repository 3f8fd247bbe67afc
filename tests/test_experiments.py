"""The studies of experiments/ at a tiny size: each runs as `python -m experiments.<study>`, writes its results file
and reuses every stage on a second run; the runner's stages in processes of their own; and the shape of the
package (no `sys.path` edits outside tests, no Python under scripts/)."""

import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import small_fashion_mnist

from experiments import ablations, miniature, probe_study, runner, small_data_sweep
from experiments.runner import StageFailed, run_entry_point

REPO = Path(__file__).resolve().parents[1]
STUDIES = ["ablations", "demo", "layer_decay", "pretraining_length", "probe_study", "segmentation_demo", "small_data_sweep"]


def test_every_module_of_experiments_is_a_study_tested_here_or_shared():
    modules = sorted(path.stem for path in (REPO / "experiments").glob("*.py") if path.stem != "__init__")
    assert modules == sorted([*STUDIES, "miniature", "runner"])


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_runs_as_a_module_from_the_repository_root(study):
    result = subprocess.run([sys.executable, "-m", f"experiments.{study}", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_no_sys_path_edits_outside_tests_and_no_python_under_scripts():
    edits = re.compile(r"sys\.path\s*(\.insert|\.append|\[|\+=|=)")
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = [path for path in tracked if not path.startswith("tests/") and edits.search((REPO / path).read_text())]
    assert not offenders
    assert not [path for path in (REPO / "scripts").rglob("*") if path.suffix == ".py"]


def in_this_process(argv: list[str], log: Path, threads=None, echo=True) -> None:
    """run_entry_point's stand-in for the tests: the entry point's main(argv) in this process (no start-up cost)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    importlib.import_module(Path(argv[0]).stem).main(argv[1:])
    log.write_text("ran in the test's process\n")


def test_an_entry_point_in_its_own_process_keeps_its_log_and_says_why_it_failed(tmp_path):
    run_entry_point(["-c", "print('hello from the stage')"], tmp_path / "ok.log", threads=1, echo=False)
    assert (tmp_path / "ok.log").read_text().strip() == "hello from the stage"
    with pytest.raises(StageFailed, match=r"exit 3: ValueError: bad input"):
        run_entry_point(["-c", "import sys; print('ValueError: bad input'); sys.exit(3)"], tmp_path / "bad.log", echo=False)
    assert "bad input" in (tmp_path / "bad.log").read_text()


def test_a_missing_dataset_other_than_the_miniature_s_is_refused_with_the_command_that_builds_it(tmp_path):
    with pytest.raises(SystemExit, match="download_dataset.py --dataset fashion-mnist"):
        runner.ensure_dataset(tmp_path / "missing", runner.Stages())


def test_probe_study_probes_each_encoder_and_a_second_run_reuses_them(tmp_path, capsys):
    dataset = small_fashion_mnist(tmp_path / "fashion-mnist")
    miniature.save_untrained_encoder(tmp_path / "demo" / probe_study.ENCODERS["random init"])  # as the demo leaves it
    argv = [
        "--demo_dir", str(tmp_path / "demo"), "--dataset", str(dataset), "--output_dir", str(tmp_path / "study"),
        "--seeds", "1", "--encoders", "random init", "--protocols", "knn", "linear", "--attention", "causal", "bidirectional",
    ]  # fmt: skip
    results = probe_study.main(argv)
    records = results["records"]
    assert len(records) == 2 * 2 and all(0 <= record["accuracy"] <= 1 and record["seconds"] > 0 for record in records)
    saved = json.loads((tmp_path / "study" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results)) and saved["command"] == shlex.join(["python", "-m", "experiments.probe_study", *argv])
    table = (tmp_path / "study" / "results.md").read_text()
    assert "| random init | bidirectional |" in table and "| random init | causal |" in table
    assert "| NEPA-pretrained |" not in table
    capsys.readouterr()
    probe_study.main(["--print", str(tmp_path / "study" / "results.json")])
    assert capsys.readouterr().out.strip() == table.strip()  # the table, printed again from the saved results

    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "study").rglob("eval_results.json")}
    assert probe_study.main(argv)["records"] == records  # every probe reused, its seconds too
    assert {path: path.stat().st_mtime_ns for path in before} == before
    with pytest.raises(SystemExit):  # the demo's pretrained encoder is not there
        probe_study.main([*argv[:argv.index("--encoders")], "--encoders", "NEPA-pretrained"])
    assert "has no encoder: run `python -m experiments.demo` first" in capsys.readouterr().err


def test_ablation_table_runs_its_rows_and_a_second_run_reuses_them(tmp_path, monkeypatch, capsys):
    """One row of the masking table, with the fine-tune (2 steps), each stage in this process."""
    dataset = small_fashion_mnist(tmp_path / "fashion-mnist")
    monkeypatch.setattr(ablations, "run_entry_point", in_this_process)
    monkeypatch.setitem(ablations.TABLES, "masking", {**ablations.TABLES["masking"], "rows": ablations.TABLES["masking"]["rows"][1:2]})
    monkeypatch.setitem(miniature.FINETUNE_STEPS, ablations.FINETUNE_PERCENT, 2)
    argv = ["--table", "masking", "--max_steps", "2", "--dataset", str(dataset), "--output_dir", str(tmp_path / "abl"), "--finetune"]
    results = ablations.main(argv)

    assert results["command"] == shlex.join(["python", "-m", "experiments.ablations", *argv])
    saved = json.loads((tmp_path / "abl" / "masking.json").read_text())
    assert saved == json.loads(json.dumps(results))
    [row] = saved["rows"]
    assert row["overrides"] == {"nepa_mask_ratio": 0.4} and row["switches"] == ["40 %"]
    [seed] = row["seeds"]
    assert seed["failed"] is None and all(0 <= seed[key] <= 1 for key in ("knn", "linear", "finetune"))
    row_dir = tmp_path / "abl" / "masking" / "0_nepa_mask_ratio-0p4" / "seed1337"
    assert json.loads((row_dir / "pretrain" / "config.json").read_text())["nepa_mask_ratio"] == 0.4
    # The classifier keeps the encoder's own config, with the dataset's classes.
    assert len(json.loads((row_dir / "cls" / "config.json").read_text())["id2label"]) == 10
    table = (tmp_path / "abl" / "masking.md").read_text()
    assert table.count("\n| 40 % |") == 1 and "fine-tune top-1 (10 % labels)" in table

    capsys.readouterr()
    assert ablations.main(["--print", str(tmp_path / "abl" / "masking.json")]) == saved
    assert capsys.readouterr().out == table
    again = ablations.main(argv)
    assert "==>" not in capsys.readouterr().out  # every stage reused
    assert json.loads(json.dumps(again["rows"])) == saved["rows"]


def test_a_failing_ablation_stage_is_kept_and_the_row_goes_on(tmp_path, monkeypatch):
    dataset = small_fashion_mnist(tmp_path / "fashion-mnist", per_split=20)

    def fail(argv, log, threads=None, echo=True):
        raise StageFailed("exit 1: RuntimeError: loss is NaN")

    monkeypatch.setattr(ablations, "run_entry_point", fail)
    monkeypatch.setitem(ablations.TABLES, "masking", {**ablations.TABLES["masking"], "rows": ablations.TABLES["masking"]["rows"][:1]})
    results = ablations.main(["--table", "masking", "--dataset", str(dataset), "--output_dir", str(tmp_path / "abl")])
    assert results["rows"][0]["seeds"][0]["failed"] == "pretrain: exit 1: RuntimeError: loss is NaN"
    assert "fails (pretrain: exit 1: RuntimeError: loss is NaN)" in (tmp_path / "abl" / "masking.md").read_text()


def test_small_data_sweep_fine_tunes_its_grid_and_a_second_run_reuses_it(tmp_path, monkeypatch, capsys):
    dataset = small_fashion_mnist(tmp_path / "fashion-mnist")  # the image folder reads the same Debian files
    monkeypatch.setattr(small_data_sweep, "run_entry_point", in_this_process)
    argv = [
        "--output_dir", str(tmp_path / "sweep"), "--dataset", str(dataset), "--per_class", "3", "--val_per_class", "2",
        "--pretrain_steps", "2", "--augmentations", "none", "light", "--learning_rates", "1e-3", "--epochs", "1",
    ]  # fmt: skip
    table = small_data_sweep.main(argv)
    assert table == (tmp_path / "sweep" / "results.md").read_text().strip()
    assert "| 1 | none | 0.001 | " in table and "| 1 | light | 0.001 | " in table
    saved = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert [call["command"] for call in saved["calls"]] == [shlex.join(["python", "-m", "experiments.small_data_sweep", *argv])]
    assert [(run["augmentation"], run["lr"], run["epochs"], run["seed"]) for run in saved["runs"]] == [("none", 1e-3, 1, 0), ("light", 1e-3, 1, 0)]
    for run in ("none-0.001-1-0", "light-0.001-1-0"):
        results = json.loads((tmp_path / "sweep" / "runs" / run / "eval_results.json").read_text())
        assert round(results["eval_runtime"] * results["eval_samples_per_second"]) == 20  # the validation folder
    # The classifier: the miniature's fine-tuning config, the image folder's classes.
    assert len(json.loads((tmp_path / "sweep" / "classifier" / "config.json").read_text())["id2label"]) == 10

    capsys.readouterr()
    assert small_data_sweep.main(argv) == table
    assert "==>" not in capsys.readouterr().out  # every stage reused
    # A second call with another grid adds its runs to the one table of the folder.
    more = small_data_sweep.main([*argv[: argv.index("--augmentations")], "--augmentations", "none", "--learning_rates", "3e-3", "--epochs", "1"])
    assert "| 1 | none | 0.001 | " in more and "| 1 | none | 0.003 | " in more
    assert len(json.loads((tmp_path / "sweep" / "results.json").read_text())["calls"]) == 2  # both calls recorded
    capsys.readouterr()
    assert small_data_sweep.main(["--print", str(tmp_path / "sweep" / "results.json")]) == more
    assert capsys.readouterr().out.strip() == more
