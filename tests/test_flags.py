"""Every flag an entry point declares is used by the run it is given to, or refused: one mechanism (`nepa.args.Use`
tables, enforced by `parse_arguments` / `parse_flags`) rather than checks case by case.

What these tests prove, and what they do not:
- for the dataclass entry points, every field of their own argument classes, of `DataArguments` and of what the
  `Nepa*TrainingArguments` classes add or redeclare is classified: either its table says where it applies, and
  the test gives it in a run where it does not and sees it refused by name; or it applies to every run, and
  `ALWAYS_USED` names the test that shows it changing the run (the test checks that test exists, not that it
  passes: the suite runs it). The ~100 flags `TrainingArguments` itself declares are the Trainer's and are not
  walked, except those an entry point's table names;
- for the argparse entry points, every flag `--help` lists is walked the same way.
"""

import json
import re
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

import download_dataset
import eval as eval_script
import export_timm  # noqa: F401 (walked through sys.modules)
import init_nepa_cls_from_pretrain
import train_finetune
import train_pretrain
import train_segmentation
import visualize
from nepa.args import DATA_FLAG_USES, TRAINING_FLAG_USES, DataArguments, field_default, parse_arguments

TESTS = Path(__file__).resolve().parent

# Flags that every run of the entry point uses, and the test that shows each changing what runs.
ALWAYS_USED = {
    "model_name_or_path": "test_every_entry_point_answers_a_hub_id_with_the_download_to_run_and_never_reaches_the_hub",
    "image_processor_name": "test_every_entry_point_answers_a_hub_id_with_the_download_to_run_and_never_reaches_the_hub",
    "config_overrides": "test_finetuning_config_comes_from_the_folder_and_flags_apply_only_when_given",
    "drop_path": "test_finetuning_config_comes_from_the_folder_and_flags_apply_only_when_given",
    "is_causal": "test_finetuning_config_comes_from_the_folder_and_flags_apply_only_when_given",
    "model_revision": "test_release_model_id_asks_for_a_local_download",
    "train_dir": "test_bad_images_are_skipped_and_named",
    "validation_dir": "test_bad_images_are_skipped_and_named",
    "image_column_name": "test_column_names_eval_subset_and_crop_pct_change_the_evaluation",
    "label_column_name": "test_column_names_eval_subset_and_crop_pct_change_the_evaluation",
    "strict_images": "test_bad_images_are_skipped_and_named",
    "use_ema": "test_evaluation_alone_reads_the_folders_ema",
    "lr_scheduler_type": "test_warmup_ratio_gives_the_schedule_of_a_fractional_warmup_steps",
    "protocol": "test_frozen_feature_protocols_on_a_pretraining_folder",
    "crop_pct": "test_column_names_eval_subset_and_crop_pct_change_the_evaluation",
    "resize_size": "test_eval_of_the_reference_fixture_agrees_with_its_expected_logits",
    "max_eval_samples": "test_column_names_eval_subset_and_crop_pct_change_the_evaluation",
    "crop_size": "test_entry_point_refuses_bad_sizes_encoders_to_evaluate_and_classification_flags",
    "output_dir": "test_the_folders_ema_is_exported_unless_raw_weights_are_asked_for",
    "raw_weights": "test_the_folders_ema_is_exported_unless_raw_weights_are_asked_for",
    "pretrained_model_id": "test_conversion_copies_the_backbone_and_reports_the_new_tensors",
    "add_code_only": "test_add_code_only_refuses_conversion_flags_and_other_models",
    "dataset": "test_fashion_mnist_from_debian_files",
    "imagefolder": "test_imagefolder_is_saved_self_contained",
    "overwrite": "test_existing_dataset_is_replaced_only_with_overwrite",
    "image": "test_maps_for_every_image_mode",
    "trainer_state": "test_training_curves",
    "knn_eval_steps": "test_knn_and_rankme_are_logged_at_the_asked_steps",
    "images_in_memory": "test_entry_points_train_from_memory_and_refuse_randaugment",
}

# A value other than the default for each flag whose type alone does not give a valid one.
SAMPLES = {
    "lr_scheduler_type": "linear", "linear_features": ["mean"], "attentive_blocks": ["1"], "knn_k": ["5"],
    "crop_scale": ["0.5", "1"], "crop_ratio": ["0.5", "1"], "train_scale": ["64", "32"], "eval_scale": ["64", "32"],
    "ratio_range": ["1", "1"], "out_indices": ["1", "2"], "warmup_ratio": "0.1", "ema_decay": "0.5",
    "probe_lrs": ["0.5"], "query_rowcol": "1,1", "layer": "0", "heads": "max",
}  # fmt: skip


def sample(name: str, default) -> list[str]:
    value = SAMPLES.get(name)
    if value is None:
        kind = type(default)
        value = str(not default) if kind is bool else str(default + 1) if kind in (int, float) else "1"
    return [value] if isinstance(value, str) else value


def nepa_training_fields(training_class) -> list[str]:
    """The fields the project's training-argument classes add to (or redeclare on) TrainingArguments."""
    names = []
    for klass in training_class.__mro__:
        if klass is TrainingArguments:
            return names
        names += [name for name in klass.__dict__.get("__annotations__", {}) if name not in names]
    return names


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("flags")
    for name, model_type in (("encoder", "vit_nepa"), ("upernet", "upernet")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({"model_type": model_type}))
    return SimpleNamespace(encoder=str(root / "encoder"), upernet=str(root / "upernet"), output=str(root / "out"))


def dataclass_entry_points(folders) -> dict:
    """(argument classes, table, runs): each run a command line, for finding one that a flag does not apply to."""
    out = ["--output_dir", folders.output]
    model = ["--model_name_or_path", folders.encoder, *out]
    return {
        "train_pretrain": (
            (train_pretrain.ModelArguments, DataArguments, train_pretrain.NepaTrainingArguments, train_pretrain.MonitorArguments),
            train_pretrain.FLAG_USES,
            [out, [*model, "--do_train"]],
        ),
        "train_finetune": (
            (train_finetune.FinetuneArguments, DataArguments, train_finetune.FinetuneTrainingArguments), train_finetune.FLAG_USES,
            [model, [*model, "--do_train", "--freeze_vit", "True"], [*model, "--do_train", "--mixup", "0", "--cutmix", "0"],
             [*model, "--do_train", "--cutmix", "0"]],
        ),
        "eval": (
            (eval_script.EvalArguments, DataArguments, eval_script.EvalTrainingArguments), eval_script.FLAG_USES,
            [[*model, "--protocol", protocol] for protocol in eval_script.PROTOCOLS],
        ),
        "train_segmentation": (
            (train_segmentation.SegmentationArguments, DataArguments, train_segmentation.SegmentationTrainingArguments),
            train_segmentation.FLAG_USES,
            [model, ["--model_name_or_path", folders.upernet, *out, "--do_train", "--do_eval"]],
        ),
    }  # fmt: skip


def test_every_flag_of_the_dataclass_entry_points_is_used_or_refused(folders):
    unclassified = []
    for script, (classes, table, runs) in dataclass_entry_points(folders).items():
        runs = [*runs, [*runs[0], "--train_dir", "d"], [*runs[0], "--load_from_disk", "True"]]  # the data sources
        uses = {**DATA_FLAG_USES, **TRAINING_FLAG_USES, **table}
        specs = {spec.name: spec for cls in classes for spec in fields(cls)}
        names = [spec.name for spec in fields(classes[0])] + [spec.name for spec in fields(DataArguments)]
        names += nepa_training_fields(classes[2]) + [spec.name for cls in classes[3:] for spec in fields(cls)]
        for name in names:
            use = uses.get(name)
            if use is None:
                if name not in ALWAYS_USED:
                    unclassified.append(f"{script} --{name}")
                continue
            flag = [f"--{name}", *sample(name, field_default(specs[name]))]
            for run in runs:  # the first run the flag does not apply to
                parsed = parse_arguments(classes, [*run, *flag])
                values = {spec.name: getattr(arguments, spec.name) for arguments in parsed for spec in fields(arguments)}
                if not use.when(SimpleNamespace(**values)):
                    with pytest.raises(ValueError, match=rf"^--{name} "):
                        parse_arguments(classes, [*run, *flag], table)
                    break
            else:
                unclassified.append(f"{script} --{name}: declared conditional, but every run of the test uses it")
    assert not unclassified, unclassified


ARGPARSE_ENTRY_POINTS = {
    "init_nepa_cls_from_pretrain": (
        init_nepa_cls_from_pretrain.parse_args, init_nepa_cls_from_pretrain.FLAG_USES,
        [["--pretrained_model_id", "p", "--add_code_only"], ["--pretrained_model_id", "p", "--dataset_name", "d"]],
    ),
    "download_dataset": (download_dataset.parse_args, download_dataset.FLAG_USES, [["--imagefolder", "d"]]),
    "visualize": (visualize.parse_args, visualize.FLAG_USES, [["--output_dir", "o", "--trainer_state", "t.json"]]),
    "export_timm": (None, {}, []),
}  # fmt: skip


@pytest.mark.parametrize("script", ARGPARSE_ENTRY_POINTS)
def test_every_flag_of_the_argparse_entry_points_is_used_or_refused(script, capsys):
    module = sys.modules[script]
    with pytest.raises(SystemExit):
        (module.parse_args if script != "export_timm" else module.main)(["--help"])
    listed = sorted(set(re.findall(r"(?<![\w-])--(\w+)(?![\w-])", capsys.readouterr().out)) - {"help"})
    parse, table, runs = ARGPARSE_ENTRY_POINTS[script]
    unclassified = []
    for name in listed:
        if name not in table:
            if name not in ALWAYS_USED:
                unclassified.append(name)
            continue
        for run in runs:
            try:
                with pytest.raises(SystemExit):
                    parse([*run, f"--{name}", *sample(name, None)])
            except pytest.fail.Exception:
                continue
            if re.search(rf"error: --{name} ", capsys.readouterr().err):
                break
        else:
            unclassified.append(f"{name}: never refused by the test's runs")
    assert not unclassified, unclassified


def test_always_used_flags_name_a_test_that_exists():
    source = "\n".join(path.read_text() for path in TESTS.glob("test_*.py"))
    missing = {flag: name for flag, name in ALWAYS_USED.items() if f"def {name}(" not in source}
    assert not missing, missing


def test_training_args_bin_records_the_command_line_not_the_trainers_internal_settings(tmp_path):
    """The probe grid clips each head itself and NepaTrainer deletes old checkpoints itself, switching the Trainer's
    own off; the saved training_args.bin still says what was asked: --max_grad_norm 1.0, --save_total_limit 1."""
    from helpers import COMMON, build_image_dataset, save_processor, tiny_config

    from models.vit_nepa import ViTNepaForPreTraining

    dataset = build_image_dataset(tmp_path / "data", num_classes=2, per_class=4, val_per_class=2)
    torch.manual_seed(0)
    ViTNepaForPreTraining(tiny_config(image_size=16, patch_size=4)).save_pretrained(tmp_path / "encoder")
    save_processor(tmp_path / "encoder")
    eval_script.main([
        "--model_name_or_path", str(tmp_path / "encoder"), "--dataset_name", str(dataset), "--load_from_disk", "True",
        "--output_dir", str(tmp_path / "probe"), "--protocol", "linear", "--linear_features", "mean", "--probe_lrs", "0.1",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_grad_norm", "1.0", "--save_strategy", "steps",
        "--save_steps", "1", "--save_total_limit", "1", "--seed", "0", *COMMON,
    ])  # fmt: skip
    saved = torch.load(tmp_path / "probe" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert (saved.max_grad_norm, saved.save_total_limit) == (1.0, 1)
    assert not (tmp_path / "probe" / "checkpoint-1").exists()  # and the limit was kept


def test_column_names_eval_subset_and_crop_pct_change_the_evaluation(tmp_path):
    """--image_column_name / --label_column_name read renamed columns (without them the run fails on the missing
    column), --max_eval_samples scores that many images, --crop_pct changes what is scored."""
    import datasets
    from helpers import COMMON, build_image_dataset, save_processor, tiny_config

    from models.vit_nepa import ViTNepaForImageClassification

    built = build_image_dataset(tmp_path / "data", num_classes=2, per_class=2, val_per_class=6)
    renamed = datasets.load_from_disk(str(built)).rename_columns({"image": "picture", "label": "kind"})
    renamed.save_to_disk(str(tmp_path / "renamed"))
    torch.manual_seed(0)
    config = tiny_config(image_size=16, patch_size=4, num_labels=2, is_causal=False, add_pooling_layer=True)
    ViTNepaForImageClassification(config).save_pretrained(tmp_path / "cls")
    save_processor(tmp_path / "cls")

    def evaluate(name, *flags):
        argv = ["--model_name_or_path", str(tmp_path / "cls"), "--dataset_name", str(tmp_path / "renamed"), "--load_from_disk", "True",
                "--output_dir", str(tmp_path / name), "--seed", "0", *COMMON, *flags]  # fmt: skip
        return eval_script.main(argv)

    with pytest.raises((KeyError, ValueError), match="image"):
        evaluate("default_columns")
    columns = ["--image_column_name", "picture", "--label_column_name", "kind"]
    whole = evaluate("whole", *columns)
    assert round(whole["eval_runtime"] * whole["eval_samples_per_second"]) == 12
    subset = evaluate("subset", *columns, "--max_eval_samples", "5")
    assert round(subset["eval_runtime"] * subset["eval_samples_per_second"]) == 5
    assert evaluate("tight", *columns, "--crop_pct", "0.5")["eval_loss"] != whole["eval_loss"]


def test_backbone_honours_return_dict():
    """ViTNepaBackbone.forward took return_dict and never read it; with False it returns the output's tuple, as every
    other ViT-NEPA forward does."""
    from helpers import tiny_config

    from models.vit_nepa import ViTNepaBackbone

    backbone = ViTNepaBackbone(tiny_config(num_hidden_layers=3, out_indices=[0, 1, 2, 3])).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        as_dict, as_tuple = backbone(pixels), backbone(pixels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    for expected, actual in zip(as_dict.feature_maps, as_tuple[0]):
        torch.testing.assert_close(actual, expected)


def test_eval_py_honours_use_ema(tmp_path):
    """--use_ema False evaluates the raw weights only, though the folder has an EMA (eval.py used to overwrite the
    flag with whether the file exists); --use_ema True on a folder without one is refused."""
    from helpers import COMMON, build_image_dataset, save_processor, tiny_config
    from safetensors.torch import save_file

    from models.vit_nepa import ViTNepaForImageClassification

    dataset = build_image_dataset(tmp_path / "data", num_classes=2, per_class=2, val_per_class=2)
    torch.manual_seed(0)
    model = ViTNepaForImageClassification(tiny_config(image_size=16, patch_size=4, num_labels=2, is_causal=False, add_pooling_layer=True))
    model.save_pretrained(tmp_path / "cls")
    save_processor(tmp_path / "cls")

    def evaluate(name, *flags):
        argv = ["--model_name_or_path", str(tmp_path / "cls"), "--dataset_name", str(dataset), "--load_from_disk", "True",
                "--output_dir", str(tmp_path / name), "--seed", "0", *COMMON, *flags]  # fmt: skip
        return eval_script.main(argv)

    with pytest.raises(FileNotFoundError, match="--use_ema True, but .* has no model_ema.safetensors"):
        evaluate("required", "--use_ema", "True")
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, tmp_path / "cls" / "model_ema.safetensors")
    assert "eval_ema_accuracy" in evaluate("default")
    assert "eval_ema_accuracy" not in evaluate("raw", "--use_ema", "False")
