"""Evaluation counts every validation image once, whatever `--dataloader_drop_last` says (scripts/common.sh passes
True to every training recipe; the Trainer would apply it to evaluation too): the fine-tuning run's final
evaluation, eval.py on the saved folder, the frozen probes and segmentation all score a 99-image split at a batch
of 64 as they score it in one batch of 128."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import COMMON, REPO, build_image_dataset, fashion_mnist_canvases, save_processor, tiny_config

import eval as eval_script
import train_finetune
import train_segmentation
from models.vit_nepa import ViTNepaForImageClassification, ViTNepaForPreTraining

DROP_LAST = ["--dataloader_drop_last", "True"]
SCORES = ("accuracy", "top5", "loss")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """3 classes: 12 training and 99 validation images (64 + 35)."""
    return build_image_dataset(tmp_path_factory.mktemp("data"), num_classes=3, per_class=4, val_per_class=33)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    config = tiny_config(image_size=16, patch_size=4, num_labels=3, is_causal=False, add_pooling_layer=True)
    ViTNepaForImageClassification(config).save_pretrained(folder)
    save_processor(folder)
    return folder


def data_args(model: Path, dataset: Path, output_dir: Path, eval_batch: int) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--dataset_name", str(dataset), "--load_from_disk", "True",
        "--output_dir", str(output_dir), "--per_device_eval_batch_size", str(eval_batch), "--seed", "0", *COMMON,
    ]  # fmt: skip


def test_finetuning_and_eval_py_score_all_99_images(tmp_path, classifier_dir, dataset_dir):
    train = ["--do_train", "--do_eval", "--max_steps", "2", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2"]
    train += ["--ema_decay", "0.5", "--save_strategy", "no", "--aa", "", "--mixup", "0", "--cutmix", "0", *DROP_LAST]
    trained = train_finetune.main(data_args(classifier_dir, dataset_dir, tmp_path / "sft", 64) + train)
    evaluated = eval_script.main(data_args(tmp_path / "sft", dataset_dir, tmp_path / "eval", 64) + DROP_LAST)
    whole = eval_script.main(data_args(tmp_path / "sft", dataset_dir, tmp_path / "one_batch", 128))
    for prefix in ("eval", "eval_ema"):
        for score in SCORES:
            key = f"{prefix}_{score}"
            assert evaluated[key] == trained[key], key  # the same batches of the same weights: exactly
            assert evaluated[key] == pytest.approx(whole[key], abs=1e-6), key  # and every image of the split
        assert round(evaluated[f"{prefix}_accuracy"] * 99, 6).is_integer()


@pytest.mark.parametrize("protocol", ["linear", "attentive"])
def test_probes_score_all_99_images(tmp_path, dataset_dir, protocol):
    folder = tmp_path / "encoder"
    torch.manual_seed(0)
    ViTNepaForPreTraining(tiny_config(image_size=16, patch_size=4)).save_pretrained(folder)
    save_processor(folder)
    probe = ["--protocol", protocol, "--probe_lrs", "0.01", "--max_steps", "2", "--per_device_train_batch_size", "8", *DROP_LAST]
    probe += ["--save_strategy", "no"] + (["--attentive_blocks", "1"] if protocol == "attentive" else ["--linear_features", "mean"])
    at_64 = eval_script.main(data_args(folder, dataset_dir, tmp_path / "b64", 64) + probe)
    at_128 = eval_script.main(data_args(folder, dataset_dir, tmp_path / "b128", 128) + probe)
    for score in SCORES:
        assert at_64[f"eval_{score}"] == pytest.approx(at_128[f"eval_{score}"], abs=1e-6), score


def test_segmentation_scores_every_image(tmp_path):
    """5 canvases at an evaluation batch of 2 (2 + 2 + 1) score as in one batch of 8."""
    built = fashion_mnist_canvases(tmp_path / "canvases", 5)
    encoder = tmp_path / "encoder"
    torch.manual_seed(0)
    ViTNepaForPreTraining(tiny_config(image_size=28, patch_size=4, num_hidden_layers=3, out_indices=[0, 1, 2, 3])).save_pretrained(encoder)
    save_processor(encoder, 28)
    seg = ["--crop_size", "56", "--train_scale", "56", "56", "--ratio_range", "1", "1", "--photometric", "False",
           "--decoder_hidden_size", "32", "--auxiliary_channels", "32", "--save_strategy", "no"]  # fmt: skip
    train = ["--do_train", "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", *DROP_LAST]
    train_segmentation.main(data_args(encoder, built, tmp_path / "seg", 8) + seg + train)
    scores = {}
    for batch, flags in ((2, ["--do_eval", *DROP_LAST]), (8, ["--do_eval"])):
        args = data_args(tmp_path / "seg", built, tmp_path / f"eval{batch}", batch) + flags
        args += ["--eval_scale", "56", "56", "--eval_stride", "56", "--crop_size", "56"]
        scores[batch] = train_segmentation.main(args)
    for key in ("eval_mean_iou", "eval_pixel_accuracy", "eval_mean_accuracy"):
        assert scores[2][key] == pytest.approx(scores[8][key], abs=1e-9), key


def test_two_processes_score_each_image_once(tmp_path, classifier_dir, dataset_dir):
    """99 images over 2 processes at 64 each (64 + 35, split 32 / 32 then 18 / 17): accelerate repeats an image to
    even the last batches and the gathered metrics drop it, so eval.py scores what one process does."""
    one = eval_script.main(data_args(classifier_dir, dataset_dir, tmp_path / "one", 64) + DROP_LAST)
    argv = data_args(classifier_dir, dataset_dir, tmp_path / "two", 32) + DROP_LAST
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*launcher, str(REPO / "eval.py"), *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert round(two["eval_runtime"] * two["eval_samples_per_second"]) == 99
    for score in SCORES:
        assert two[f"eval_{score}"] == pytest.approx(one[f"eval_{score}"], abs=1e-6), score
