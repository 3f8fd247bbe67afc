"""The original release's command lines run unchanged: every flag its scripts pass to `run_nepa.py` and
`run_image_classification.py` is accepted by `train_pretrain.py` / `train_finetune.py` (and its evaluation
command by `eval.py`) with the same meaning, including the defaults those commands rely on (an EMA of the
weights, decay 0.9999). The commands are written out as the release's scripts expand them on one node of
8 GPUs (NGPU=8, WORLD_SIZE=1)."""

import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from transformers import HfArgumentParser
from helpers import COMMON, recipe_command, tiny_config, write_config_folder

import eval as eval_script
import export_timm
import init_nepa_cls_from_pretrain
import train_finetune
import train_pretrain
import train_segmentation
import visualize
from models.vit_nepa import ViTNepaForImageClassification, ViTNepaForPreTraining
from nepa.args import DataArguments, NepaTrainingArguments, parse_arguments
from nepa.data import BatchNormalize
from nepa.trainer import NepaTrainer

REPO = Path(__file__).resolve().parents[1]

# scripts/pretrain/nepa_b.sh and nepa_l.sh of the release: total batch 4096, lr 3e-4 * 4096 / 256.
PRETRAIN = [
    "--ddp_backend", "nccl", "--ddp_find_unused_parameters", "False",
    "--load_from_disk", "True", "--dataloader_drop_last", "True",
    "--do_train", "--remove_unused_columns", "False",
    "--num_train_epochs", "1600",
    "--learning_rate", "0.0048", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.025",
    "--weight_decay", "0.05", "--adam_beta1", "0.9", "--adam_beta2", "0.95", "--optim", "adamw_torch",
    "--logging_strategy", "steps", "--logging_steps", "100", "--save_strategy", "steps", "--save_steps", "50000",
    "--seed", "1337", "--bf16", "True",
    "--dataloader_num_workers", "32", "--dataloader_persistent_workers", "True", "--dataloader_pin_memory", "False",
    "--report_to", "wandb",
]  # fmt: skip
PRETRAIN_B = [
    "--config_name", "configs/pretrain/nepa-base-patch14-224", "--image_processor_name", "configs/pretrain/nepa-base-patch14-224",
    "--dataset_name", "data/imagenet-1k-hf", "--output_dir", "outputs/nepa-base-patch14-224",
    "--per_device_train_batch_size", "256", "--gradient_accumulation_steps", "2",
    "--run_name", "nepa-base-patch14-224", *PRETRAIN,
]  # fmt: skip
PRETRAIN_L = [
    "--config_name", "configs/pretrain/nepa-large-patch14-224", "--image_processor_name", "configs/pretrain/nepa-large-patch14-224",
    "--dataset_name", "data/imagenet-1k-hf", "--output_dir", "outputs/nepa-large-patch14-224",
    "--per_device_train_batch_size", "128", "--gradient_accumulation_steps", "4",
    "--run_name", "nepa-large-patch14-224", *PRETRAIN,
]  # fmt: skip


def finetune(name: str, learning_rate: str, warmup_ratio: str, llrd: str) -> list[str]:
    """scripts/finetune/nepa_{b,l}_sft.sh of the release: total batch 1024 = 128 x 8 GPUs, no accumulation."""
    return [
        "--ddp_backend", "nccl", "--ddp_find_unused_parameters", "False",
        "--model_name_or_path", f"SixAILab/{name}", "--model_revision", "init",
        "--freeze_vit", "False", "--freeze_embed", "True",
        "--dataset_name", "data/imagenet-1k-hf", "--load_from_disk", "True", "--dataloader_drop_last", "True",
        "--do_train", "--output_dir", f"outputs/{name}", "--remove_unused_columns", "False",
        "--num_train_epochs", "100", "--per_device_train_batch_size", "128", "--gradient_accumulation_steps", "1",
        "--learning_rate", learning_rate, "--lr_scheduler_type", "cosine",
        "--lr_scheduler_kwargs", '{"custom_scheduler_type": "llrd_cosine_warmup"}',
        "--warmup_ratio", warmup_ratio, "--weight_decay", "0.05", "--adam_beta1", "0.9", "--adam_beta2", "0.999",
        "--optim", "adamw_torch", "--llrd", llrd, "--ema_decay", "0.9999",
        "--logging_strategy", "steps", "--logging_steps", "100",
        "--eval_strategy", "epoch", "--save_strategy", "epoch", "--load_best_model_at_end", "True",
        "--metric_for_best_model", "eval_ema_accuracy", "--save_total_limit", "1",
        "--seed", "1337", "--bf16", "True",
        "--dataloader_num_workers", "32", "--dataloader_persistent_workers", "True", "--dataloader_pin_memory", "False",
        "--report_to", "wandb", "--run_name", name,
    ]  # fmt: skip


FINETUNE_B = finetune("nepa-base-patch14-224-sft", "0.006", "0.20", "0.65")  # base lr 1.5e-3 * 1024 / 256
FINETUNE_L = finetune("nepa-large-patch14-224-sft", "0.004", "0.30", "0.75")  # base lr 1e-3 * 1024 / 256


def evaluate(name: str) -> list[str]:
    """scripts/eval/nepa_{b,l}_sft_eval.sh of the release (run_image_classification.py with --do_eval only)."""
    return [
        "--ddp_backend", "nccl", "--ddp_find_unused_parameters", "False",
        "--model_name_or_path", f"SixAILab/{name}", "--dataset_name", "data/imagenet-1k-hf", "--load_from_disk", "True",
        "--do_eval", "True", "--per_device_eval_batch_size", "128", "--remove_unused_columns", "False",
        "--bf16", "True", "--dataloader_num_workers", "32", "--dataloader_persistent_workers", "True",
        "--dataloader_pin_memory", "False",
    ]  # fmt: skip


# Here bf16 needs --use_cpu (one of the tests' COMMON flags). The release's commands run under torchrun (--ddp_backend
# makes accelerate expect a process group), so they are parsed in one torchrun process on the CPU, where gloo stands in
# for NCCL.
ARGUMENTS = {
    "pretrain": (train_pretrain.ModelArguments, DataArguments, NepaTrainingArguments),
    "finetune": (train_finetune.FinetuneArguments, DataArguments, train_finetune.FinetuneTrainingArguments),
    "eval": (eval_script.EvalArguments, DataArguments, NepaTrainingArguments),
}
COMMANDS = {
    "pretrain nepa_b": ("pretrain", PRETRAIN_B),
    "pretrain nepa_l": ("pretrain", PRETRAIN_L),
    "finetune nepa_b_sft": ("finetune", FINETUNE_B),
    "finetune nepa_l_sft": ("finetune", FINETUNE_L),
    **{f"{kind} {name}_eval": (kind, evaluate(f"nepa-{size}-patch14-224-sft"))
       for kind in ("eval", "finetune") for name, size in (("nepa_b_sft", "base"), ("nepa_l_sft", "large"))},
}  # fmt: skip
PARSE_ALL = """
import dataclasses, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from helpers import COMMON
from test_release_commands import ARGUMENTS, COMMANDS
from nepa.args import parse_arguments
parsed = {}
for name, (kind, argv) in COMMANDS.items():
    argv = ["gloo" if value == "nccl" else value for value in argv] + COMMON
    parsed[name] = [vars(arguments) for arguments in parse_arguments(ARGUMENTS[kind], argv)]
print("PARSED " + json.dumps(parsed, default=str))
"""


@pytest.fixture(scope="module")
def parsed() -> dict[str, list[dict]]:
    """Each command's parsed dataclasses as dicts, by command name."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "--no-python"]
    command = [*launcher, sys.executable, "-c", PARSE_ALL, str(REPO)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("PARSED "))
    return json.loads(line.removeprefix("PARSED "))


@pytest.mark.parametrize("name", ["pretrain nepa_b", "pretrain nepa_l"])
def test_release_pretraining_commands_parse_with_their_meaning(parsed, name):
    model_args, data_args, args = parsed[name]
    assert model_args["config_name"] == model_args["image_processor_name"]
    assert data_args["load_from_disk"] and args["dataloader_drop_last"] and not args["ddp_find_unused_parameters"]
    assert args["warmup_steps"] == 0.025  # --warmup_ratio 0.025
    assert args["use_ema"] and args["ema_decay"] == 0.9999  # the release keeps an EMA by default
    assert args["lr_scheduler_type"] == "cosine" and (args["adam_beta1"], args["adam_beta2"]) == (0.9, 0.95)


@pytest.mark.parametrize("name, llrd, warmup", [("finetune nepa_b_sft", 0.65, 0.2), ("finetune nepa_l_sft", 0.75, 0.3)])
def test_release_finetuning_commands_parse_with_their_meaning(parsed, name, llrd, warmup):
    args, _, training_args = parsed[name]
    assert args["model_revision"] == "init" and args["freeze_embed"] and not args["freeze_vit"] and args["llrd"] == llrd
    assert training_args["warmup_steps"] == warmup and not training_args["ddp_find_unused_parameters"]
    assert training_args["use_ema"] and training_args["ema_decay"] == 0.9999  # relied on, not passed
    assert training_args["metric_for_best_model"] == "eval_ema_accuracy"
    # The release's head lr (1e-3) and augmentation are its defaults, which are this project's too.
    assert args["head_lr"] == 1e-3 and args["aa"] == "rand-m9-mstd0.5-inc1" and args["reprob"] == 0.25
    mixing = [args[key] for key in ("mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "smoothing")]
    assert mixing == [0.8, 1.0, 1.0, 0.5, 0.1]


@pytest.mark.parametrize("name", ["nepa_b_sft_eval", "nepa_l_sft_eval"])
def test_release_evaluation_commands_parse(parsed, name):
    for kind in ("eval", "finetune"):  # the release ran it through its fine-tuning script; eval.py is ours
        args, data_args, training_args = parsed[f"{kind} {name}"]
        assert args["model_name_or_path"].startswith("SixAILab/nepa-") and data_args["load_from_disk"]
        assert training_args["do_eval"] and not training_args["do_train"]


def test_release_model_id_asks_for_a_local_download():
    args = train_finetune.FinetuneArguments(model_name_or_path="SixAILab/nepa-base-patch14-224-sft", model_revision="init")
    with pytest.raises(FileNotFoundError, match="hf download SixAILab/nepa-base-patch14-224-sft --revision init"):
        train_finetune.load_classifier(args)


HUB_ID = "SixAILab/nepa-base-patch14-224"


def hub_id_commands(local: Path, output: Path) -> dict:
    """Each entry point given the Hub id for one of its folders (and local folders for the others): (main, argv, flag)."""
    out = ["--output_dir", str(output), *COMMON]
    return {
        "pretraining config": (train_pretrain.main, ["--config_name", HUB_ID, *out], "--config_name"),
        "pretraining processor": (train_pretrain.main, ["--config_name", str(local), "--image_processor_name", HUB_ID, *out], "--image_processor_name"),
        "fine-tuning": (train_finetune.main, ["--model_name_or_path", HUB_ID, *out], "--model_name_or_path"),
        "evaluation": (eval_script.main, ["--model_name_or_path", HUB_ID, *out], "--model_name_or_path"),
        "segmentation": (train_segmentation.main, ["--model_name_or_path", HUB_ID, "--do_train", *out], "--model_name_or_path"),
        "visualisation": (visualize.main, ["--model_name_or_path", HUB_ID, "--image", "cat.png", "--output_dir", str(output)], "--model_name_or_path"),
        "conversion": (init_nepa_cls_from_pretrain.main, ["--pretrained_model_id", HUB_ID, "--save_local", "--local_dir", str(output)], "--pretrained_model_id"),
        "code only": (init_nepa_cls_from_pretrain.main, ["--pretrained_model_id", HUB_ID, "--add_code_only"], "--pretrained_model_id"),
        "timm export": (export_timm.main, ["--model_name_or_path", HUB_ID, "--output_dir", str(output)], "--model_name_or_path"),
        "conversion config": (
            init_nepa_cls_from_pretrain.main,
            ["--pretrained_model_id", str(local), "--config_model_id", HUB_ID, "--save_local", "--local_dir", str(output)],
            "--config_model_id",
        ),
    }  # fmt: skip


@pytest.mark.parametrize("command", list(hub_id_commands(Path(), Path())))
def test_every_entry_point_answers_a_hub_id_with_the_download_to_run_and_never_reaches_the_hub(command, tmp_path, monkeypatch):
    local = write_config_folder(tmp_path / "local")
    ViTNepaForPreTraining(tiny_config(image_size=16, patch_size=4)).save_pretrained(local)
    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: downloads.append(args))
    main, argv, flag = hub_id_commands(local, tmp_path / "out")[command]
    with pytest.raises((FileNotFoundError, SystemExit), match=f"hf download {HUB_ID} --local-dir DIR` and pass {flag} DIR"):
        main(argv)
    assert not downloads


def learning_rates(trainer_class, model, argv, steps=40, **kwargs) -> list[list[float]]:
    """The learning rate of every parameter group at every step, from the trainer's own optimiser and schedule."""
    (args,) = parse_arguments((NepaTrainingArguments,), ["--output_dir", "unused", *COMMON, *argv])
    normalize = BatchNormalize([0.5] * 3, [0.5] * 3)
    trainer = trainer_class(model=model, args=args, normalize=normalize, **kwargs)
    trainer.create_optimizer_and_scheduler(steps)
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in trainer.optimizer.param_groups])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return rates


@pytest.mark.parametrize("kind", ["pretraining", "finetuning"])
def test_warmup_ratio_gives_the_schedule_of_a_fractional_warmup_steps(kind):
    if kind == "pretraining":
        model, trainer_class, kwargs = ViTNepaForPreTraining(tiny_config()), train_pretrain.NepaPretrainer, {}
        argv = ["--lr_scheduler_type", "cosine"]
    else:
        model = ViTNepaForImageClassification(tiny_config(add_pooling_layer=True, num_labels=3, is_causal=False))
        trainer_class, kwargs, argv = train_finetune.FinetuneTrainer, {"layer_decay": 0.65, "head_lr": 1e-3}, []
    by_ratio = learning_rates(trainer_class, model, [*argv, "--warmup_ratio", "0.1"], **kwargs)
    by_steps = learning_rates(trainer_class, model, [*argv, "--warmup_steps", "0.1"], **kwargs)
    assert by_ratio == by_steps
    if kind == "pretraining":  # one group schedule: linear warm-up over the 4 steps that are 10 % of 40
        peak = by_ratio[4][0]
        assert [round(step[0] / peak, 6) for step in by_ratio[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert by_ratio[5][0] < peak


def test_warmup_ratio_and_warmup_steps_together_are_refused():
    with pytest.raises(ValueError, match="--warmup_ratio 0.05 and --warmup_steps 100.0 both set the warm-up"):
        parse_arguments((NepaTrainingArguments,), ["--output_dir", "unused", "--warmup_ratio", "0.05", "--warmup_steps", "100"])
    with pytest.raises(ValueError, match="not a fraction"):
        parse_arguments((NepaTrainingArguments,), ["--output_dir", "unused", "--warmup_ratio", "5"])


def test_fsdp_with_ema_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="--fsdp with --use_ema True .* Pass --use_ema False"):
        parse_arguments((NepaTrainingArguments,), ["--output_dir", "unused", *COMMON, "--fsdp", "full_shard"])
    (args,) = parse_arguments((NepaTrainingArguments,), ["--output_dir", "unused", *COMMON, "--fsdp", "full_shard", "--use_ema", "False"])
    assert args.fsdp and not args.use_ema


def test_ema_is_on_unless_turned_off():
    (args,) = parse_arguments((NepaTrainingArguments,), ["--output_dir", "unused"])
    assert args.use_ema and args.ema_decay == 0.9999
    (args,) = parse_arguments((NepaTrainingArguments,), ["--output_dir", "unused", "--use_ema", "False"])
    assert not args.use_ema
    trainer = NepaTrainer(model=ViTNepaForPreTraining(tiny_config()), args=args, normalize=BatchNormalize([0.5] * 3, [0.5] * 3))
    assert trainer.ema is None


# --- this project's recipe scripts: one home for each number -------------------------------------------------------

ENTRY_POINT_ARGUMENTS = {
    "train_pretrain.py": (*ARGUMENTS["pretrain"], train_pretrain.MonitorArguments),
    "train_finetune.py": ARGUMENTS["finetune"],
    "eval.py": (eval_script.EvalArguments, DataArguments, eval_script.EvalTrainingArguments),
    "train_segmentation.py": (train_segmentation.SegmentationArguments, DataArguments, train_segmentation.SegmentationTrainingArguments),
}
# What the architecture flags of an entry point default to when not given (a None default that means a value).
RESOLVED_DEFAULTS = {"train_segmentation.py": train_segmentation.ENCODER_DEFAULTS}
# Flags a script computes for the machine it runs on, which may land on a default: the per-device batches and their
# accumulation (from TOTAL_BATCH and the GPUs present), and the logging backend (from what is installed).
LAYOUT = {"per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "report_to"}


# Every shell recipe that launches an entry point, with the environment it needs besides MODEL ({tmp}: the test's
# folder, where custom.sh's dataset and converted classifier exist, so it goes straight to the launch).
RECIPE_SCRIPTS = {
    "pretrain/nepa_b.sh": {}, "pretrain/nepa_l.sh": {},
    "finetune/nepa_b_sft.sh": {}, "finetune/nepa_l_sft.sh": {}, "finetune/nepa_b_sft.sh RECIPE=paper": {"RECIPE": "paper"},
    "finetune/custom.sh": {"IMAGES": "{tmp}/images", "DATA_DIR": "{tmp}/data", "OUTPUT_DIR": "{tmp}/custom"},
    **{f"eval/nepa_{size}_{run}.sh": {} for size in "bl" for run in ("sft_eval", "knn", "linear", "attentive")},
    **{f"segmentation/nepa_{size}_ade20k.sh": {"DATA_DIR": "{tmp}/data"} for size in "bl"},
}  # fmt: skip


def recipe_values(tmp_path: Path, name: str) -> tuple[str, dict, dict, list[str]]:
    """A recipe's command on one node of 8 GPUs as its entry point's parser reads it, before the dataclasses check
    it: (entry point, values, defaults, the flags the command passes)."""
    for made in (tmp_path / "data" / "dataset_dict.json", tmp_path / "custom-cls" / "model.safetensors"):
        made.parent.mkdir(exist_ok=True)
        made.write_text("{}")
    env = {key: value.format(tmp=tmp_path) for key, value in RECIPE_SCRIPTS[name].items()}
    argv = recipe_command(tmp_path, name.split()[0], NPROC_PER_NODE="8", **env)[:-2]
    parser = HfArgumentParser(ENTRY_POINT_ARGUMENTS[argv[0]])
    values, unknown = parser.parse_known_args(argv[1:])
    assert not unknown, unknown
    resolved = RESOLVED_DEFAULTS.get(argv[0], {})
    given = [value[2:] for value in argv[1:] if value.startswith("--")]
    defaults = {flag: resolved.get(flag) if parser.get_default(flag) is None else parser.get_default(flag) for flag in given}
    return argv[0], vars(values), defaults, given


@pytest.mark.parametrize("name", list(RECIPE_SCRIPTS))
def test_a_recipe_passes_no_number_that_its_entry_point_defaults_to(tmp_path, name):
    """One home for each number (docs/recipes.md): the entry points' defaults are the release's recipe, and a script
    passes a flag only where its run differs from them (ViT-L against ViT-B, paths, the run's own numbers). A flag
    passed at its default would be a second home, where editing the default changes nothing."""
    _, values, defaults, given = recipe_values(tmp_path, name)
    repeated = {flag: values[flag] for flag in given if flag not in LAYOUT and values[flag] == defaults[flag]}
    assert not repeated, f"{name} passes these at their defaults: {repeated}"


# The recipe's numbers, which this project's scripts and the release's commands must agree on.
RELEASE_FIELDS = [
    "learning_rate", "num_train_epochs", "lr_scheduler_type", "weight_decay", "adam_beta1", "adam_beta2", "seed", "bf16",
    "use_ema", "ema_decay", "logging_steps", "dataloader_drop_last",
]  # fmt: skip
FINETUNE_FIELDS = [
    "llrd", "llrd_end", "head_lr", "freeze_embed", "freeze_vit", "aa", "reprob", "mixup", "cutmix", "mixup_prob",
    "mixup_switch_prob", "smoothing", "eval_strategy", "save_strategy", "load_best_model_at_end",
]  # fmt: skip


@pytest.mark.parametrize(
    "script, release",
    [("pretrain/nepa_b.sh", PRETRAIN_B), ("pretrain/nepa_l.sh", PRETRAIN_L), ("finetune/nepa_b_sft.sh", FINETUNE_B), ("finetune/nepa_l_sft.sh", FINETUNE_L)],
)  # fmt: skip
def test_the_recipe_scripts_run_the_releases_numbers(tmp_path, script, release):
    """What the recipe scripts leave to the defaults and what they pass add up to the release's commands, on the same
    8 GPUs: the same total batch, schedule, optimiser, regularisation and EMA."""
    entry_point, ours, _, _ = recipe_values(tmp_path, script)
    theirs, _ = HfArgumentParser(ENTRY_POINT_ARGUMENTS[entry_point]).parse_known_args(release)
    theirs = vars(theirs)
    fields = RELEASE_FIELDS + (FINETUNE_FIELDS if "finetune" in script else ["save_steps"])
    assert {key: ours[key] for key in fields} == pytest.approx({key: theirs[key] for key in fields})
    assert ours["warmup_steps"] == pytest.approx(theirs["warmup_ratio"])
    total = {values["per_device_train_batch_size"] * values["gradient_accumulation_steps"] * 8 for values in (ours, theirs)}
    assert len(total) == 1
