"""Turn a NEPA pretraining checkpoint into an image classifier ready for fine-tuning.

    python init_nepa_cls_from_pretrain.py --pretrained_model_id outputs/nepa-b \
        --config_model_id configs/finetune/nepa-base-patch14-224-sft --save_local --local_dir outputs/nepa-b-cls

Without `--config_model_id` the classifier's config is the pretrained one made bidirectional, with
mean pooling and drop path 0.1. Every backbone tensor is copied. New: fc_norm (ones / zeros), a
zero-initialised classifier, and QK-norm affine weights that the pretraining checkpoint lacks (ones).
Anything else missing or left over is an error. A `--config_model_id` may differ from the pretrained config only
where fine-tuning is meant to differ (`MEANT_TO_CHANGE`: attention direction, pooling, drop path and dropout, RoPE
augmentation, labels; QK-norm may gain affine weights); a field that changes what the backbone computes (width,
activation, LayerNorm epsilon, RoPE base, QK-norm, LayerScale, image size, ...) is refused by name. Booleans take True / False (`--use_ema True`); a bare
`--use_ema` means True. `--disable_layerscale` folds each LayerScale lambda into the dense layer before it.
Both folders are local, as everywhere in this project (`nepa.checkpoint`): a Hub id fails with the `hf download`
command that fetches it.

Every folder it saves loads in plain `transformers` with `trust_remote_code=True` (it carries the modelling
code and an `auto_map`). `--add_code_only` adds the same to the local folder `--pretrained_model_id` (a
released `SixAILab/nepa-*` download, say) and converts nothing.
"""

import argparse
import inspect
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor

from models.vit_nepa import ViTNepaConfig, ViTNepaForImageClassification, make_self_contained
from nepa.args import Use, add_bool_argument, parse_flags
from nepa.checkpoint import local_folder
from nepa.ema import EMA_WEIGHTS_NAME

# The config fields a fine-tuning config may change, and why that is safe; every other field of ViTNepaConfig (width,
# depth, activation, LayerNorm epsilon, RoPE base, QK-norm, ...) must be the pretrained one, or the copied weights
# would compute another function. LayerScale is compared by presence: its value only initialises the lambdas. QK-norm
# may gain learned weights and biases (qk_norm_affine, qk_norm_bias): added as ones and zeros, they change nothing.
MEANT_TO_CHANGE = {
    "is_causal": "the attention direction of fine-tuning",
    "add_pooling_layer": "the classifier's pooling",
    "drop_path_prob": "training-time regularisation",
    "hidden_dropout_prob": "training-time regularisation",
    "attention_probs_dropout_prob": "training-time regularisation",
    "pos_embed_shift": "training-time RoPE augmentation",
    "pos_embed_jitter": "training-time RoPE augmentation",
    "pos_embed_rescale": "training-time RoPE augmentation",
    "initializer_range": "initialises only the new tensors",
    "nepa_shift": "a pretraining objective field",
    "nepa_stop_grad": "a pretraining objective field",
    "nepa_mask_ratio": "a pretraining device, set to 0",
    "out_features": "what a segmentation backbone returns",
    "out_indices": "what a segmentation backbone returns",
}
PREFIX = "vit_nepa."


def dataset_label_names(dataset_name: str, label_column: str) -> list[str]:
    import datasets

    from nepa.data import label_names

    if not Path(dataset_name).is_dir():
        raise FileNotFoundError(f"--dataset_name {dataset_name} is not a folder written by download_dataset.py.")
    split = datasets.load_from_disk(dataset_name)["train"]
    names = label_names(split, label_column)
    if names is None:
        raise ValueError(f"the {label_column!r} column of {dataset_name} is not a ClassLabel: pass --num_labels.")
    return names


def function_changes(pretrained: ViTNepaConfig, target: ViTNepaConfig, folding_layerscale: bool) -> list[str]:
    """Each field of `target` that differs from `pretrained` and is not `MEANT_TO_CHANGE` (nor LayerScale while it is
    folded), as 'name: a vs b'."""
    changes = []
    for name in inspect.signature(ViTNepaConfig.__init__).parameters:
        if name in ("self", "kwargs") or name in MEANT_TO_CHANGE or (folding_layerscale and name == "layerscale_value"):
            continue
        before, after = getattr(pretrained, name), getattr(target, name)
        if name == "layerscale_value":
            before, after = ("none" if value is None else "LayerScale" for value in (before, after))
        if name in ("qk_norm_affine", "qk_norm_bias") and after:
            continue  # learned QK-norm weights (ones) and biases (zeros) added: the same function
        if before != after:
            changes.append(f"{name}: pretrained {before} vs target {after}")
    return changes


def target_config(args, pretrained_config: ViTNepaConfig) -> ViTNepaConfig:
    if args.config_model_id:
        config = ViTNepaConfig.from_pretrained(local_folder(args.config_model_id, "--config_model_id"))
    else:
        # The fine-tuning architecture of the released configs: bidirectional, mean-pooled, drop path 0.1 (ViT-B's).
        changes = {"is_causal": False, "add_pooling_layer": True, "drop_path_prob": 0.1}
        config = ViTNepaConfig.from_dict({**pretrained_config.to_dict(), **changes})
    if args.disable_layerscale:  # folded into the dense layers exactly (fold_layerscale)
        config.layerscale_value = None
    mismatched = function_changes(pretrained_config, config, args.disable_layerscale)
    if mismatched:
        raise ValueError(
            f"--config_model_id {args.config_model_id} changes what the pretrained backbone computes: "
            + "; ".join(mismatched)
            + ". Use a config with the pretrained values (only "
            + ", ".join(MEANT_TO_CHANGE)
            + " may differ, and qk_norm_affine / qk_norm_bias may be switched on), or leave --config_model_id out."
        )
    config.nepa_mask_ratio = 0.0  # the mask token is a pretraining device
    if args.dataset_name:
        names = dataset_label_names(args.dataset_name, args.label_column_name)
        config.id2label, config.label2id = dict(enumerate(names)), {name: i for i, name in enumerate(names)}
    elif args.num_labels:
        config.num_labels = args.num_labels
    config.architectures = ["ViTNepaForImageClassification"]
    return config


def fold_layerscale(state: dict[str, torch.Tensor], num_layers: int) -> None:
    """x + ls * (W h + b) == x + (diag(ls) W) h + ls * b: scale each dense layer's rows and bias."""
    for i in range(num_layers):
        layer = f"{PREFIX}encoder.layer.{i}."
        for scale, dense in (("layer_scale", "attention.output.dense"), ("output.layer_scale", "output.dense")):
            lambda1 = state.pop(f"{layer}{scale}.lambda1")
            state[f"{layer}{dense}.weight"] = state[f"{layer}{dense}.weight"] * lambda1[:, None]
            state[f"{layer}{dense}.bias"] = state[f"{layer}{dense}.bias"] * lambda1


def convert(args) -> ViTNepaForImageClassification:
    folder = local_folder(args.pretrained_model_id, "--pretrained_model_id", args.pretrained_revision)
    pretrained_config = ViTNepaConfig.from_pretrained(folder)
    weights_file = folder / (EMA_WEIGHTS_NAME if args.use_ema else "model.safetensors")
    if not weights_file.is_file():
        hint = " (it was pretrained with --use_ema False)" if args.use_ema else ""
        raise FileNotFoundError(f"{weights_file} does not exist{hint}.")
    state = {
        (key if key.startswith(PREFIX) else PREFIX + key): tensor for key, tensor in load_file(weights_file).items()
    }

    config = target_config(args, pretrained_config)
    if args.disable_layerscale and pretrained_config.layerscale_value is not None:
        fold_layerscale(state, config.num_hidden_layers)
    dropped = sorted(key for key in state if key.endswith("embeddings.mask_token"))
    for key in dropped:
        del state[key]

    model = ViTNepaForImageClassification(config)
    expected = model.state_dict()
    new = {}
    for key, tensor in expected.items():
        if key in state:
            continue
        if key.startswith(("fc_norm.", "classifier.")) or key.endswith(("q_norm.weight", "k_norm.weight", "q_norm.bias", "k_norm.bias")):
            new[key] = torch.ones_like(tensor) if key.endswith("norm.weight") else torch.zeros_like(tensor)
    missing = sorted(set(expected) - set(state) - set(new))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the pretrained weights do not fit the classifier: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. "
            f"LayerScale lambdas left over need --disable_layerscale; other keys mean the configs differ."
        )
    shapes = [f"{key}: {tuple(state[key].shape)} vs {tuple(expected[key].shape)}" for key in state if state[key].shape != expected[key].shape]
    if shapes:
        raise ValueError("tensor shapes differ: " + "; ".join(shapes))
    model.load_state_dict({**state, **new}, strict=True)

    print(f"copied {len(state)} tensors from {weights_file}")
    print(f"new ({len(new)}): {', '.join(sorted(new))}")
    if dropped:
        print(f"dropped: {', '.join(dropped)}")
    return model


def converting(where: str, condition=lambda arguments: True) -> Use:
    """A flag of the conversion, which --add_code_only does not run."""
    return Use(f"{where}, and not with --add_code_only (which converts nothing)", lambda a: not a.add_code_only and condition(a))


# Where each flag applies (nepa.args.parse_flags refuses it elsewhere); --pretrained_model_id is always used.
FLAG_USES = {
    **{name: converting("is used only when converting") for name in (
        "pretrained_revision", "config_model_id", "use_ema", "disable_layerscale", "save_local", "push_to_hub")},
    "num_labels": converting("is used only without --dataset_name, whose classes set the labels", lambda a: not a.dataset_name),
    "dataset_name": converting("is used only when converting"),
    "label_column_name": converting("is used only with --dataset_name", lambda a: bool(a.dataset_name)),
    "local_dir": converting("is used only with --save_local", lambda a: a.save_local),
    "new_model_id": converting("is used only with --push_to_hub", lambda a: a.push_to_hub),
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_id", required=True, help="a local pretraining folder (a Hub id gets the hf download to run)")
    parser.add_argument("--pretrained_revision", default=None, help="the Hub revision --pretrained_model_id was downloaded at")
    parser.add_argument("--config_model_id", default=None, help="a local fine-tuning config folder (default: pretrained, bidirectional)")
    parser.add_argument("--num_labels", type=int, default=None, help="number of classes (generic label names)")
    parser.add_argument("--dataset_name", default=None, help="a download_dataset.py folder: take its class names")
    parser.add_argument("--label_column_name", default="label")
    add_bool_argument(parser, "--use_ema", f"start from {EMA_WEIGHTS_NAME} instead of the raw weights")
    add_bool_argument(parser, "--disable_layerscale", "fold LayerScale into the dense layers")
    add_bool_argument(parser, "--save_local", "save to --local_dir")
    parser.add_argument("--local_dir", default=None, help="default: ./<pretrained folder name>-cls")
    add_bool_argument(parser, "--push_to_hub", "push to --new_model_id")
    parser.add_argument("--new_model_id", default=None)
    add_bool_argument(parser, "--add_code_only", "only add the modelling code and auto_map to --pretrained_model_id")
    args = parse_flags(parser, argv, FLAG_USES)
    if args.add_code_only:
        return args
    if not (args.save_local or args.push_to_hub):
        parser.error("nothing would be written: pass --save_local (and --local_dir) or --push_to_hub --new_model_id.")
    if args.push_to_hub and not args.new_model_id:
        parser.error("--push_to_hub needs --new_model_id.")
    return args


def run(args: argparse.Namespace) -> None:
    if args.add_code_only:
        make_self_contained(local_folder(args.pretrained_model_id, "--pretrained_model_id"))
        print(f"added the modelling code and auto_map to {os.path.abspath(args.pretrained_model_id)}")
        return
    model = convert(args)
    processor_source = Path(args.config_model_id) if args.config_model_id else None
    if processor_source is None or not (processor_source / "preprocessor_config.json").is_file():
        processor_source = Path(args.pretrained_model_id)
    processor = AutoImageProcessor.from_pretrained(processor_source)

    if args.save_local:
        local_dir = args.local_dir or f"{Path(args.pretrained_model_id.rstrip('/')).name}-cls"
        model.save_pretrained(local_dir)
        processor.save_pretrained(local_dir)
        print(f"saved the classifier to {os.path.abspath(local_dir)}")
    if args.push_to_hub:
        try:
            model.push_to_hub(args.new_model_id)
            processor.push_to_hub(args.new_model_id)
        except Exception as error:
            raise ConnectionError(
                f"could not push to {args.new_model_id} ({type(error).__name__}: {error}); "
                f"run `hf auth login` where there is network, or use --save_local."
            ) from error


def main(argv: list[str] | None = None) -> None:
    """Convert and write as the command line says; a problem exits with its message, not a traceback."""
    try:
        run(parse_args(argv))
    except (OSError, ValueError) as error:  # FileNotFoundError and ConnectionError are OSErrors
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
