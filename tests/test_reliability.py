"""Reliability of the training scripts: killed runs resume exactly, bad images
are skipped and named, a non-finite loss stops (or skips) without NaN weights, bad arguments fail before any
image is read, and two processes give the loss curve of one. Tiny models on CPU; the entry points run
in-process through their `main(argv)` unless the test needs a real process (SIGKILL, torchrun)."""

import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import COMMON, save_processor, write_config_folder
from image_folder import add_bad_images, make_image_folder
from safetensors.torch import load_file
from transformers import ViTImageProcessor

import download_dataset
import init_nepa_cls_from_pretrain
import train_finetune
import train_pretrain
from models.vit_nepa import ViTNepaConfig, ViTNepaForPreTraining
from nepa.checkpoint import CHECKPOINT_COMPLETE
from nepa.data import BadImageError, ImageDataset, RandomCropFlip, collate_images
from nepa.nonfinite import NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO)}
REAL_PRETRAINING_FORWARD = ViTNepaForPreTraining.forward
TOLERANCE = 1e-5


def write_tiny_model(folder: Path, **config_changes) -> Path:
    """config.json and preprocessor_config.json of a 16 px, 4 px-patch, 2-layer ViT-NEPA."""
    write_config_folder(folder, qk_norm=False)
    if config_changes:  # written into the JSON: ViTNepaConfig itself refuses to build a broken geometry
        config_file = folder / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config_changes}))
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """download_dataset.py's build of 4 classes x 4 training images (16: 4 batches of 4 an epoch), 1 validation each."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    source = make_image_folder(root / "photos", num_classes=4, per_class=4, val_per_class=1)
    return download_dataset.main(["--imagefolder", str(source), "--output_dir", str(root / "photos-hf")])


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory, tiny_model) -> Path:
    """Weights as train_pretrain.py saves them (no classifier)."""
    folder = tmp_path_factory.mktemp("pretrained")
    ViTNepaForPreTraining(ViTNepaConfig.from_pretrained(tiny_model)).save_pretrained(folder)
    ViTImageProcessor.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def convert_to_classifier(pretrained: Path, output: Path, *label_source: str) -> Path:
    """init_nepa_cls_from_pretrain.py; `label_source` is --dataset_name DIR or --num_labels N."""
    init_nepa_cls_from_pretrain.main(
        ["--pretrained_model_id", str(pretrained), *label_source, "--save_local", "--local_dir", str(output)]
    )
    return output


@pytest.fixture(scope="module")
def classifier_3_labels(tmp_path_factory, pretrained_folder) -> Path:
    return convert_to_classifier(pretrained_folder, tmp_path_factory.mktemp("classifier") / "cls", "--num_labels", "3")


def common_args(output_dir: Path, **flags) -> list[str]:
    """COMMON, then these values and `flags` (a later flag wins, so `flags` may change COMMON's too)."""
    values = dict(output_dir=output_dir, seed=0, learning_rate=1e-3, logging_steps=1, per_device_train_batch_size=4)
    values.update(flags)
    return [*COMMON, *(item for name, value in values.items() for item in (f"--{name}", str(value)))]


def saved_dataset(path: Path) -> list[str]:
    return ["--dataset_name", str(path), "--load_from_disk", "True"]


def pretrain_args(model: Path, dataset: Path, output_dir: Path, **flags) -> list[str]:
    return ["--config_name", str(model), *saved_dataset(dataset), "--do_train", *common_args(output_dir, **flags)]


def logged_losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def global_step(output_dir: Path) -> int:
    return json.loads((output_dir / "trainer_state.json").read_text())["global_step"]


def complete_checkpoints(output_dir: Path) -> list[int]:
    markers = output_dir.glob(f"checkpoint-*/{CHECKPOINT_COMPLETE}")
    return sorted(int(marker.parent.name.split("-")[1]) for marker in markers)


def assert_same_tensors(file_a: Path, file_b: Path, atol: float = 0.0) -> None:
    a, b = load_file(file_a), load_file(file_b)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=f"{name} differs: {file_a} vs {file_b}")


def assert_finite(weights_file: Path) -> None:
    for name, tensor in load_file(weights_file).items():
        assert torch.isfinite(tensor).all(), f"{weights_file}: {name} holds NaN/inf"


def assert_same_curve(losses: dict[int, float], reference: dict[int, float], steps) -> None:
    for step in steps:
        assert losses[step] == pytest.approx(reference[step], abs=TOLERANCE), f"loss at step {step}"


# --- killed runs ----------------------------------------------------------------------------------------------------


def test_killed_run_resumes_exactly_from_newest_complete_checkpoint(tmp_path, tiny_model, tiny_dataset, caplog):
    """SIGKILL after the first checkpoint, a half-written checkpoint planted as the newest, the same command again:
    it skips the half-written one loudly, resumes from the newest complete one, stops at max_steps, and its losses,
    weights and EMA weights are the uninterrupted run's (optimizer, scheduler, RNG, data position and EMA restored;
    the resume lands mid-epoch and crosses epoch boundaries). Named explicitly, the half-written one is refused."""
    flags = dict(max_steps=12, save_steps=2, use_ema=True, ema_decay=0.9)
    reference = tmp_path / "uninterrupted"
    train_pretrain.main(pretrain_args(tiny_model, tiny_dataset, reference, **flags))

    output_dir = tmp_path / "killed"
    args = pretrain_args(tiny_model, tiny_dataset, output_dir, **flags)
    command = [sys.executable, str(REPO / "train_pretrain.py"), *args]
    log_file = tmp_path / "killed.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT)
        while not complete_checkpoints(output_dir):
            assert process.poll() is None, f"the run ended before its first checkpoint:\n{log_file.read_text()}"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    assert not (output_dir / "trainer_state.json").exists(), "the run finished before it was killed"

    newest_complete = complete_checkpoints(output_dir)[-1]
    newest = output_dir / f"checkpoint-{newest_complete}"
    history_at_newest = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    half_written = output_dir / "checkpoint-11"  # newer than any other; save_steps 2 never writes this one
    shutil.copytree(newest, half_written)
    (half_written / CHECKPOINT_COMPLETE).unlink()
    weights = half_written / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    # The next checkpoint, killed while it was written (the killed run may have begun it): resuming writes it again.
    rewritten = output_dir / f"checkpoint-{newest_complete + 2}"
    shutil.rmtree(rewritten, ignore_errors=True)
    shutil.copytree(newest, rewritten)
    (rewritten / CHECKPOINT_COMPLETE).unlink()

    with pytest.raises(ValueError, match=f"{half_written} has no {CHECKPOINT_COMPLETE} marker"):
        train_pretrain.main([*args, "--resume_from_checkpoint", str(half_written)])
    with caplog.at_level(logging.WARNING, logger="nepa"):
        train_pretrain.main(args)
    messages = [record.getMessage() for record in caplog.records if record.name.startswith("nepa.")]
    for skipped in (half_written, rewritten):
        assert any(message.startswith(f"Skipping {skipped}: it has no {CHECKPOINT_COMPLETE}") for message in messages)
    assert any(message.startswith(f"Resuming from {newest} ") for message in messages)
    assert not (half_written / CHECKPOINT_COMPLETE).exists() and weights.stat().st_size == 64  # never touched
    assert complete_checkpoints(output_dir) == [2, 4, 6, 8, 10, 12]  # the rewritten one whole this time

    assert global_step(output_dir) == 12
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == list(range(1, 13))
    # The steps up to the checkpoint are its log lines as they were, not a re-run's.
    assert [entry for entry in history if entry["step"] <= newest_complete] == history_at_newest
    assert_same_curve(logged_losses(output_dir), logged_losses(reference), range(1, 13))
    assert_same_tensors(output_dir / "model.safetensors", reference / "model.safetensors", atol=TOLERANCE)
    assert_same_tensors(output_dir / "model_ema.safetensors", reference / "model_ema.safetensors", atol=TOLERANCE)


def test_image_augmentation_depends_on_seed_epoch_and_index_only(tiny_dataset):
    """What makes the resume (and the multi-process curve) exact: an image's random crop and flip come from its own
    seed, so neither the process's random state, nor dataloader workers (persistent ones included), change them."""
    split = datasets.load_from_disk(str(tiny_dataset))["train"]
    dataset = ImageDataset(split, RandomCropFlip(16), label_column=None, seed=0)

    def epochs(**loader_options) -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_images, **loader_options)
        images = []
        for epoch in range(2):
            dataset.set_epoch(epoch)
            torch.manual_seed(epoch + 100)  # the process's own stream must not matter
            images.append(torch.cat([batch["pixel_values"] for batch in loader]))
        return images

    in_process = epochs()
    assert not torch.equal(in_process[0], in_process[1])  # a new epoch, new crops
    for options in (dict(num_workers=2), dict(num_workers=2, persistent_workers=True)):
        for ours, theirs in zip(epochs(**options), in_process):
            assert torch.equal(ours, theirs)


# --- bad images -----------------------------------------------------------------------------------------------------


def skip_messages(caplog) -> list[str]:
    messages = [record.getMessage() for record in caplog.records if record.name == "nepa.data"]
    return [message for message in messages if message.startswith("skipped ")]


def assert_skips_named(messages: list[str], bad_files: list[Path]) -> None:
    """Every undecodable file named by its plain path (not a file:// URI), no decodable one, and a running count."""
    assert messages, "no image was reported as skipped"
    for path in bad_files:
        assert any(f"cannot decode image {path}: " in message for message in messages), f"{path} not named"
    assert not any("odd_" in message or "file://" in message for message in messages)
    assert f"({len(messages)} skipped so far in process {os.getpid()})" in messages[-1]


def test_bad_images_are_skipped_and_named(tmp_path, tiny_model, caplog):
    """Truncated, empty and text-as-.jpg files are skipped and named; CMYK, 16-bit, grey, RGBA, 1x1 and 4000x3000
    images train. Pretraining and fine-tuning on a download_dataset.py build, pretraining on the raw image folder
    (datasets' imagefolder loader stores paths and decodes nothing, so it does not choke either);
    --strict_images True stops at the first bad file instead, naming it."""
    source = make_image_folder(tmp_path / "photos", num_classes=2, per_class=3, val_per_class=1)
    bad_files = add_bad_images(source / "train")  # 15 training files: every one is read in the first 4 steps
    dataset = download_dataset.main(["--imagefolder", str(source), "--output_dir", str(tmp_path / "photos-hf")])
    flags = dict(max_steps=4, do_eval=True)

    pretrained = tmp_path / "pretrained"
    train_pretrain.main(pretrain_args(tiny_model, dataset, pretrained, **flags))
    assert_skips_named(skip_messages(caplog), bad_files)
    assert global_step(pretrained) == 4

    caplog.clear()
    classifier = convert_to_classifier(pretrained, tmp_path / "classifier", "--dataset_name", str(dataset))
    finetune_data = ["--model_name_or_path", str(classifier), *saved_dataset(dataset), "--do_train"]
    metrics = train_finetune.main(finetune_data + common_args(tmp_path / "finetuned", **flags))
    assert_skips_named(skip_messages(caplog), bad_files)
    assert "eval_accuracy" in metrics and global_step(tmp_path / "finetuned") == 4

    caplog.clear()
    folders = ["--train_dir", str(source / "train"), "--validation_dir", str(source / "val"), "--do_train"]
    folder_flags = dict(cache_dir=tmp_path / "hf_cache", **flags)
    train_pretrain.main(["--config_name", str(tiny_model), *folders, *common_args(tmp_path / "folder", **folder_flags)])
    assert_skips_named(skip_messages(caplog), bad_files)

    with pytest.raises(BadImageError) as error:
        train_pretrain.main(pretrain_args(tiny_model, dataset, tmp_path / "strict", strict_images=True, **flags))
    assert error.value.path in map(str, bad_files)
    assert str(error.value).startswith(f"cannot decode image {error.value.path}: ")
    assert not (tmp_path / "strict" / "model.safetensors").exists()


# --- divergence -----------------------------------------------------------------------------------------------------


def poison_training_forward(monkeypatch, nan_at: int) -> None:
    """Make the `nan_at`-th training forward (micro-batch) return a NaN loss that back-propagates NaN gradients."""
    calls = itertools.count(1)

    def forward(self, *args, **kwargs):
        outputs = REAL_PRETRAINING_FORWARD(self, *args, **kwargs)
        if self.training and next(calls) == nan_at:
            outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(ViTNepaForPreTraining, "forward", forward)


def optimizer_steps_taken(checkpoint: Path) -> set[int]:
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return {int(param_state["step"]) for param_state in state.values()}


def assert_step_skipped(output_dir: Path, step: int) -> None:
    """`step` changed neither the weights nor AdamW's state (its parameters had no gradients), and training went on."""
    before, skipped, after = (output_dir / f"checkpoint-{n}" for n in (step - 1, step, step + 1))
    assert_same_tensors(skipped / "model.safetensors", before / "model.safetensors")
    assert optimizer_steps_taken(skipped) == optimizer_steps_taken(before) == {step - 1}
    assert optimizer_steps_taken(after) == {step}
    with pytest.raises(AssertionError):
        assert_same_tensors(after / "model.safetensors", skipped / "model.safetensors")
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert {entry["step"]: entry.get("skipped_steps", 0) for entry in history if "loss" in entry} == {
        n: int(n >= step) for n in range(1, global_step(output_dir) + 1)
    }
    assert_finite(output_dir / "model.safetensors")


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_nonfinite_loss_stops_or_skips_without_nan_weights(optim, tmp_path, tiny_model, tiny_dataset, monkeypatch):
    """A NaN loss at step 5 stops the run naming the step and the last good checkpoint, writing nothing more;
    with --skip_nonfinite_loss True the step is dropped whole, also under gradient accumulation. A fused optimiser
    skips the update on the device and the flag is read later; any other drops the gradients after reading it."""
    stopped = tmp_path / "stopped"
    poison_training_forward(monkeypatch, nan_at=5)
    expected = rf"non-finite loss at step 5 .* last good checkpoint is {stopped}/checkpoint-4\."
    with pytest.raises(NonFiniteLossError, match=expected):
        train_pretrain.main(pretrain_args(tiny_model, tiny_dataset, stopped, max_steps=8, save_steps=2, optim=optim))
    assert sorted(path.name for path in stopped.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert complete_checkpoints(stopped) == [2, 4]
    for checkpoint in (2, 4):
        assert_finite(stopped / f"checkpoint-{checkpoint}" / "model.safetensors")

    skipped = tmp_path / "skipped"
    poison_training_forward(monkeypatch, nan_at=3)
    flags = dict(max_steps=5, save_steps=1, skip_nonfinite_loss=True, optim=optim)
    train_pretrain.main(pretrain_args(tiny_model, tiny_dataset, skipped, **flags))
    assert global_step(skipped) == 5
    assert_step_skipped(skipped, step=3)

    # Two micro-batches a step: the NaN in step 3's first one must not let its second one's gradients through.
    accumulated = tmp_path / "accumulated"
    poison_training_forward(monkeypatch, nan_at=5)
    flags.update(max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    train_pretrain.main(pretrain_args(tiny_model, tiny_dataset, accumulated, **flags))
    assert_step_skipped(accumulated, step=3)


# --- bad arguments --------------------------------------------------------------------------------------------------


def no_data(tmp_path: Path) -> list[str]:
    """A dataset path that does not exist: an argument error must be raised before anything notices."""
    return ["--dataset_name", str(tmp_path / "no_such_dataset"), "--load_from_disk", "True"]


def patch_not_dividing_image(tmp_path, model, dataset, pretrained, classifier):
    config = write_tiny_model(tmp_path / "model", image_size=18)
    return train_pretrain.main, ["--config_name", str(config), *no_data(tmp_path)]


def processor_size_not_multiple_of_patch(tmp_path, model, dataset, pretrained, classifier):
    config = write_tiny_model(tmp_path / "model")
    save_processor(config, 18)
    return train_pretrain.main, ["--config_name", str(config), *no_data(tmp_path)]


def heads_not_dividing_hidden(tmp_path, model, dataset, pretrained, classifier):
    config = write_tiny_model(tmp_path / "model", num_attention_heads=5)
    return train_pretrain.main, ["--config_name", str(config), *no_data(tmp_path)]


def heads_override_not_dividing_hidden(tmp_path, model, dataset, pretrained, classifier):
    override = ["--config_overrides", "num_attention_heads=5"]
    return train_pretrain.main, ["--config_name", str(model), *override, *no_data(tmp_path)]


def finetuning_without_classifier(tmp_path, model, dataset, pretrained, classifier):
    return train_finetune.main, ["--model_name_or_path", str(pretrained), *no_data(tmp_path)]


def more_classes_than_labels(tmp_path, model, dataset, pretrained, classifier):
    return train_finetune.main, ["--model_name_or_path", str(classifier), *saved_dataset(dataset)]


def integer_labels_beyond_num_labels(tmp_path, model, dataset, pretrained, classifier):
    """Labels as plain integers (no ClassLabel names to count): the largest label must be checked."""
    splits = datasets.load_from_disk(str(dataset))
    datasets.DatasetDict(
        {name: split.cast_column("label", datasets.Value("int64")) for name, split in splits.items()}
    ).save_to_disk(str(tmp_path / "plain_labels"))
    return train_finetune.main, ["--model_name_or_path", str(classifier), *saved_dataset(tmp_path / "plain_labels")]


def missing_dataset_folder(tmp_path, model, dataset, pretrained, classifier):
    return train_pretrain.main, ["--config_name", str(model), *no_data(tmp_path)]


def missing_train_dir(tmp_path, model, dataset, pretrained, classifier):
    return train_pretrain.main, ["--config_name", str(model), "--train_dir", str(tmp_path / "no_such_folder")]


def missing_validation_split(tmp_path, model, dataset, pretrained, classifier):
    train_only = datasets.DatasetDict(train=datasets.load_from_disk(str(dataset))["train"])
    train_only.save_to_disk(str(tmp_path / "train_only"))
    return train_pretrain.main, ["--config_name", str(model), *saved_dataset(tmp_path / "train_only"), "--do_eval"]


def finetuning_with_another_schedule(tmp_path, model, dataset, pretrained, classifier):
    return train_finetune.main, ["--model_name_or_path", str(classifier), *no_data(tmp_path), "--lr_scheduler_type", "linear"]


def finetuning_with_schedule_arguments(tmp_path, model, dataset, pretrained, classifier):
    kwargs = ["--lr_scheduler_kwargs", '{"num_cycles": 2}']
    return train_finetune.main, ["--model_name_or_path", str(classifier), *no_data(tmp_path), *kwargs]


def finetuning_with_two_ramp_ends(tmp_path, model, dataset, pretrained, classifier):
    kwargs = ["--lr_scheduler_kwargs", '{"custom_scheduler_type": "llrd_cosine", "llrd_end": 1.0}', "--llrd_end", "0.9"]
    return train_finetune.main, ["--model_name_or_path", str(classifier), *no_data(tmp_path), *kwargs]


HEADS_MESSAGE = "hidden_size 32 is not divisible by num_attention_heads 5"


def case(arguments, error: type[Exception], message: str) -> pytest.param:
    return pytest.param(arguments, error, message, id=arguments.__name__)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        case(patch_not_dividing_image, ValueError, "patch_size 4 does not divide image_size 18"),
        case(processor_size_not_multiple_of_patch, ValueError, "size 18 is not a multiple of patch_size 4"),
        case(heads_not_dividing_hidden, ValueError, HEADS_MESSAGE),
        case(heads_override_not_dividing_hidden, ValueError, HEADS_MESSAGE),
        case(finetuning_without_classifier, ValueError, r"lacks \d+ classifier tensors .* pretraining checkpoint.*init_nepa_cls_from_pretrain\.py"),
        case(more_classes_than_labels, ValueError, "the dataset has 4 classes but the classifier has num_labels=3"),
        case(integer_labels_beyond_num_labels, ValueError, "label 3 but the classifier has num_labels=3"),
        case(missing_dataset_folder, FileNotFoundError, "no_such_dataset does not exist"),
        case(missing_train_dir, FileNotFoundError, "no_such_folder is not a directory"),
        case(missing_validation_split, KeyError, r"no 'validation' split \(splits: \['train'\]\)"),
        case(finetuning_with_another_schedule, ValueError, "--lr_scheduler_type linear: train_finetune.py schedules the release's way"),
        case(finetuning_with_schedule_arguments, ValueError, "--lr_scheduler_kwargs .* takes the release.s two layer-wise cosines"),
        case(finetuning_with_two_ramp_ends, ValueError, "--llrd_end 0.9 and --lr_scheduler_kwargs' llrd_end 1.0 disagree"),
    ],
)
def test_bad_arguments_fail_before_any_image_is_read(
    arguments, error, message, tmp_path, tiny_model, tiny_dataset, pretrained_folder, classifier_3_labels, monkeypatch
):
    main, argv = arguments(tmp_path, tiny_model, tiny_dataset, pretrained_folder, classifier_3_labels)

    def read_image(self, index):
        raise AssertionError("an image was read before the arguments were checked")

    monkeypatch.setattr(ImageDataset, "__getitem__", read_image)
    with pytest.raises(error, match=message):
        main([*argv, "--do_train", *common_args(tmp_path / "output", max_steps=2)])
    assert not (tmp_path / "output").exists()


# --- several processes ----------------------------------------------------------------------------------------------


NAN_IN_PROCESS_1 = """\
import itertools, os
import train_pretrain
from models.vit_nepa import ViTNepaForPreTraining

forward, calls = ViTNepaForPreTraining.forward, itertools.count(1)

def poisoned(self, *args, **kwargs):  # process 1's third training forward returns a NaN loss
    outputs = forward(self, *args, **kwargs)
    if self.training and next(calls) == 3 and os.environ["RANK"] == "1":
        outputs.loss = outputs.loss * float("nan")
    return outputs

ViTNepaForPreTraining.forward = poisoned
train_pretrain.main()
"""


RECORD_RANDOM_DRAWS = """\
import json, os, random, sys
import numpy as np
import torch
from timm.data import Mixup
import train_finetune

draws = {"mixup": [], "erasing": [], "drop_path": []}
mixup_params, bernoulli = Mixup._params_per_batch, torch.Tensor.bernoulli_

def recorded_mixup(self):  # lambda and the mixup / cutmix choice: numpy's stream
    lam, cutmix = mixup_params(self)
    draws["mixup"].append([float(lam), bool(cutmix)])
    return lam, cutmix

def recorded_bernoulli(self, *args, **kwargs):  # drop path's keep masks come from torch's stream, at this point of it
    draws["drop_path"].append(hash(torch.get_rng_state().numpy().tobytes()))
    return bernoulli(self, *args, **kwargs)

class RecordedErasing:  # the erasing boxes come from python's stream, at this point of it
    def __init__(self, erasing):
        self.erasing = erasing
    def __call__(self, pixels):
        draws["erasing"].append(hash(random.getstate()))
        return self.erasing(pixels)

Mixup._params_per_batch, torch.Tensor.bernoulli_ = recorded_mixup, recorded_bernoulli
batch_augment = train_finetune.batch_augment
def recorded_batch_augment(*args, **kwargs):
    augment = batch_augment(*args, **kwargs)
    augment.random_erasing = RecordedErasing(augment.random_erasing)
    return augment
train_finetune.batch_augment = recorded_batch_augment
train_finetune.main()
output_dir = sys.argv[sys.argv.index("--output_dir") + 1]
with open(os.path.join(output_dir, f"draws_{os.environ['RANK']}.json"), "w") as file:
    json.dump(draws, file)
"""


def torchrun(script: str | Path, argv: list[str], processes: int) -> None:
    """`script` under `torchrun --nproc_per_node processes` on CPU (gloo), as the recipes run it (DDP without the
    per-step search for unused parameters); one process runs plain python."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, str(REPO / script), *argv, "--ddp_find_unused_parameters", "False"]
    env = {**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]


def test_two_processes_pretrain_and_finetune_with_a_random_stream_each(tmp_path, tiny_model, tiny_dataset, pretrained_folder):
    """Two processes split the data (each reads half the 16 images: 2 batches of 4 an epoch, so 3 steps are 1.5
    epochs); fine-tuning under DDP copes with drop path and frozen layers, and in every batch the processes mix with
    different mixup lambdas (numpy's stream) and reach erasing (python's) and drop path (torch's) at different
    points of their streams."""
    pretrained = tmp_path / "pretrained"
    torchrun("train_pretrain.py", pretrain_args(tiny_model, tiny_dataset, pretrained, max_steps=3), 2)
    state = json.loads((pretrained / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert state["epoch"] == pytest.approx(1.5)
    assert (pretrained / "model.safetensors").is_file()

    classifier = convert_to_classifier(pretrained_folder, tmp_path / "classifier", "--dataset_name", str(tiny_dataset))
    finetuned = tmp_path / "finetuned"
    flags = ["--drop_path", "0.2", "--freeze_vit_layers", "1", "--model_name_or_path", str(classifier), "--do_train"]
    script = tmp_path / "recording_finetune.py"
    script.write_text(RECORD_RANDOM_DRAWS)
    torchrun(script, [*flags, *saved_dataset(tiny_dataset), *common_args(finetuned, max_steps=2, save_steps=2)], 2)
    draws = [json.loads((finetuned / f"draws_{rank}.json").read_text()) for rank in (0, 1)]
    for kind in ("mixup", "erasing", "drop_path"):
        assert len(draws[0][kind]) == len(draws[1][kind]) > 0, kind
        assert all(a != b for a, b in zip(draws[0][kind], draws[1][kind])), (kind, draws[0][kind], draws[1][kind])


@pytest.mark.slow
def test_two_processes_give_the_curve_of_one(tmp_path, tiny_model, tiny_dataset, pretrained_folder):
    """One process with batch 8 and two with batch 4 each take the same images in each step (accelerate's seedable
    sampler deals one permutation out in consecutive slices) and augment them alike (each image has its own seed),
    so their losses and weights agree to float rounding; the test compares them step by step, which a broken
    gradient all-reduce fails at once. Checkpoints of either layout resume in the other and continue the same curve.
    Every process draws from its own random stream (seeded from seed and rank), so the runs switch off what draws from it: the
    RoPE coordinate augmentation (one draw per forward, i.e. per process batch) and, in fine-tuning, mixup / cutmix,
    random erasing and drop path."""
    no_rope_augmentation = ["--config_overrides", "pos_embed_rescale=null"]
    flags = dict(max_steps=6, save_steps=3)

    def pretrain(output_dir: Path, processes: int) -> Path:
        args = pretrain_args(tiny_model, tiny_dataset, output_dir, per_device_train_batch_size=8 // processes, **flags)
        torchrun("train_pretrain.py", no_rope_augmentation + args, processes)
        return output_dir

    one, two = pretrain(tmp_path / "one_process", 1), pretrain(tmp_path / "two_processes", 2)
    assert_same_curve(logged_losses(two), logged_losses(one), range(1, 7))
    assert_same_tensors(two / "model.safetensors", one / "model.safetensors", atol=TOLERANCE)
    assert {path.name for path in (two / "checkpoint-3").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}

    for source, processes in ((one, 2), (two, 1)):
        resumed = tmp_path / f"{source.name}_resumed_in_{processes}"
        shutil.copytree(source / "checkpoint-3", resumed / "checkpoint-3")
        pretrain(resumed, processes)
        assert global_step(resumed) == 6
        assert_same_curve(logged_losses(resumed), logged_losses(one), range(1, 7))
        assert_same_tensors(resumed / "model.safetensors", one / "model.safetensors", atol=TOLERANCE)

    # A NaN in one process only: DDP has already spread its gradients to the other, so both must drop the step.
    script = tmp_path / "nan_in_process_1.py"
    script.write_text(NAN_IN_PROCESS_1)
    nan_run = tmp_path / "nan_in_process_1"
    nan_flags = dict(max_steps=4, save_steps=1, skip_nonfinite_loss=True)
    torchrun(script, no_rope_augmentation + pretrain_args(tiny_model, tiny_dataset, nan_run, **nan_flags), 2)
    assert_step_skipped(nan_run, step=3)

    # Fine-tuning: mixup / cutmix pair images across the batch, and random erasing, drop path and the RoPE
    # augmentation draw from the process's stream, so they are off; RandAugment (per-image seeds) stays on.
    classifier = convert_to_classifier(pretrained_folder, tmp_path / "classifier", "--dataset_name", str(tiny_dataset))
    config = json.loads((classifier / "config.json").read_text())
    (classifier / "config.json").write_text(json.dumps({**config, "pos_embed_rescale": None}))
    recipe = ["--mixup", "0", "--cutmix", "0", "--smoothing", "0", "--reprob", "0", "--drop_path", "0"]
    data = ["--model_name_or_path", str(classifier), *saved_dataset(tiny_dataset), "--do_train"]
    one_ft, two_ft = tmp_path / "one_process_ft", tmp_path / "two_processes_ft"
    torchrun("train_finetune.py", [*data, *recipe, *common_args(one_ft, per_device_train_batch_size=8, **flags)], 1)
    torchrun("train_finetune.py", [*data, *recipe, *common_args(two_ft, **flags)], 2)
    assert_same_curve(logged_losses(two_ft), logged_losses(one_ft), range(1, 7))
    assert_same_tensors(two_ft / "model.safetensors", one_ft / "model.safetensors", atol=TOLERANCE)
