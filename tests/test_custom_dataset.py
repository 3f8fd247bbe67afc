"""scripts/finetune/custom.sh from a user's image folder to a fine-tuned, evaluated classifier: a few dozen
generated images in 2 classes, a tiny encoder, the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import save_processor, tiny_config
from image_folder import make_image_folder

from models.vit_nepa import ViTNepaForPreTraining

REPO = Path(__file__).resolve().parents[1]


def run_custom(tmp_path: Path, images: Path) -> subprocess.CompletedProcess:
    encoder = tmp_path / "encoder"
    if not encoder.is_dir():
        ViTNepaForPreTraining(tiny_config(image_size=16, patch_size=4)).save_pretrained(encoder)
        save_processor(encoder)
    env = {
        **os.environ, "PYTHON": sys.executable, "IMAGES": str(images), "DATA_DIR": str(tmp_path / "data"),
        "PRETRAINED": str(encoder), "CONFIG": "", "OUTPUT_DIR": str(tmp_path / "run"), "TOTAL_BATCH": "8",
        "EPOCHS": "2", "CROP_PCT": "1.0", "NPROC_PER_NODE": "1", "NUM_WORKERS": "0", "REPORT_TO": "none",
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    command = ["bash", str(REPO / "scripts" / "finetune" / "custom.sh"), "--use_cpu", "True", "--bf16", "False", "--disable_tqdm", "True"]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_custom_folder_is_converted_fine_tuned_and_evaluated(tmp_path):
    images = make_image_folder(tmp_path / "photos", num_classes=2, per_class=12, val_per_class=4, size=(20, 16))
    result = run_custom(tmp_path, images)
    assert result.returncode == 0, result.stderr[-4000:]

    classifier = json.loads((tmp_path / "run-cls" / "config.json").read_text())
    assert classifier["id2label"] == {"0": "class_0", "1": "class_1"}  # the dataset's classes, in its order
    assert classifier["is_causal"] is False
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert {"eval_accuracy", "eval_top5", "eval_loss"} <= results.keys()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["id2label"] == classifier["id2label"]
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert len([entry for entry in history if "eval_accuracy" in entry]) >= 2  # every epoch, and the end


def test_custom_folder_with_one_class_is_refused_with_the_fix(tmp_path):
    images = make_image_folder(tmp_path / "photos", num_classes=1, per_class=2, val_per_class=1)
    result = run_custom(tmp_path, images)
    assert result.returncode != 0
    assert "a classifier needs at least two" in result.stderr
    assert not (tmp_path / "run-cls").exists()
