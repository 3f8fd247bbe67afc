"""Export a NEPA encoder or classifier to timm's `Eva` (the model family of timm's DINOv3 ports).

    python export_timm.py --model_name_or_path outputs/nepa-base-patch14-224-cls-sft --output_dir outputs/nepa-b-timm

writes `config.json` and `model.safetensors` in timm's folder format: the EMA weights when the folder has them
(`model_ema.safetensors`, the weights the fine-tuning recipe selects and reports), else `model.safetensors`;
`--raw_weights True` exports `model.safetensors` anyway. The export says which, and `config.json` records it
(`nepa_weights`). Load them with the LayerNorm epsilon
the export prints (timm's config.json cannot carry it, and timm's default, 1e-6, is not NEPA's 1e-12):

    import functools, timm
    model = timm.create_model("local-dir:outputs/nepa-b-timm", pretrained=True,
                              norm_layer=functools.partial(timm.layers.LayerNorm, eps=1e-12))

The mapping is exact (tests/test_export_timm.py: features and logits within 1e-5 in float32, at the native
size and at another one, in eval and in training mode). Each NEPA piece and its Eva counterpart:
- RoPE: `rope_type="dinov3"` computes NEPA's table: patch centres in [-1, 1] per axis, periods
  `rope_theta ** (4 j / head_dim)`, y frequencies then x frequencies, rotate-half layout; the CLS token (Eva's
  one prefix token) is not rotated; shift / jitter / rescale of the coordinates apply in training only, drawn
  from the random stream in NEPA's order (the same seed gives the same features), and are off in eval mode.
- QK-norm: `attn_type="rope"` (timm's `AttentionRope`, which keeps the key bias) applies LayerNorm per head to
  queries and keys before the rotation, as NEPA does; without learned affine weights they are exported as
  ones and zeros.
- LayerScale: Eva's `gamma_1` / `gamma_2` are NEPA's `lambda1` on the attention and MLP branches (ones
  without LayerScale).
- Final LayerNorm on every token (`use_post_transformer_norm`), then with `add_pooling_layer` the mean of the
  patch tokens, `fc_norm` and the classifier (`global_pool="avg"`, `use_fc_norm`). An encoder without a
  classifier exports with `num_classes=0`: `forward_head` gives the mean of its normalised patch tokens, the
  feature eval.py's k-NN and linear probes use.
Refused, with the reason: a causal encoder (Eva attends causally only when every call passes
`is_causal=True`; convert it with init_nepa_cls_from_pretrain.py, which makes it bidirectional), a classifier
on the last token (no such pooling in Eva), the learned absolute position embedding of the `use_rope=False`
ablation (Eva resizes it with antialiasing, NEPA without), dropout (Eva's MLP also drops after the
activation), and activations other than GELU (SiLU for the gated MLP).
"""

import argparse
import json
import os
from functools import partial
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import LayerNorm
from transformers import AutoConfig, AutoImageProcessor

from models.vit_nepa import ViTNepaConfig, ViTNepaForImageClassification, ViTNepaModel
from nepa.args import add_bool_argument
from nepa.checkpoint import load_model, local_folder
from nepa.ema import EMA_WEIGHTS_NAME

# A registered Eva variant whose every argument the export sets (model_args); the name only picks the class.
TIMM_ARCHITECTURE = "vit_base_patch16_dinov3"
PIL_TO_TIMM_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def check_exportable(config: ViTNepaConfig, classifier: bool) -> None:
    """Raise ValueError naming each piece Eva cannot compute exactly."""
    problems = []
    if config.is_causal:
        problems.append(
            "the encoder is causal, and Eva attends causally only when each call passes is_causal=True: convert it "
            "to a bidirectional classifier with init_nepa_cls_from_pretrain.py first"
        )
    if not config.use_rope:
        problems.append("use_rope=False (a learned absolute position embedding): Eva resizes it with antialiasing, NEPA without")
    if classifier and not config.add_pooling_layer:
        problems.append("the classifier reads the last token (add_pooling_layer=False): Eva has no such pooling")
    if config.hidden_dropout_prob or config.attention_probs_dropout_prob:
        problems.append("dropout is set: Eva's MLP also drops after the activation; set hidden_dropout_prob and attention_probs_dropout_prob to 0")
    expected_act = "silu" if config.use_gated_mlp else "gelu"
    if config.hidden_act != expected_act:
        problems.append(f"hidden_act {config.hidden_act!r}: Eva's {'gated ' if config.use_gated_mlp else ''}MLP uses {expected_act!r}")
    if int(config.hidden_size * (config.intermediate_size / config.hidden_size)) != config.intermediate_size:
        problems.append(f"intermediate_size {config.intermediate_size} is not expressible as a ratio of hidden_size {config.hidden_size}")
    if problems:
        raise ValueError("cannot export exactly to timm's Eva: " + "; ".join(problems) + ".")


def eva_arguments(config: ViTNepaConfig, num_classes: int) -> dict:
    """The Eva constructor arguments that compute what the NEPA model computes (norm_layer apart: see timm_model)."""
    return dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        num_classes=num_classes,
        global_pool="avg",
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        qkv_bias=config.qkv_bias,
        qkv_fused=True,
        qk_norm=config.qk_norm,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        swiglu_mlp=config.use_gated_mlp,
        attn_type="rope",
        drop_path_rate=config.drop_path_prob,
        # timm's create_model drops None arguments: without LayerScale the gammas are exported as ones.
        init_values=1.0 if config.layerscale_value is None else config.layerscale_value,
        class_token=True,
        num_reg_tokens=0,
        use_abs_pos_emb=False,
        use_rot_pos_emb=True,
        rope_type="dinov3",
        rope_temperature=config.rope_theta,
        rope_rotate_half=True,
        rope_grid_indexing="ij",
        rope_grid_offset=0.0,
        rope_shift_coords=config.pos_embed_shift,
        rope_jitter_coords=config.pos_embed_jitter,
        rope_rescale_coords=config.pos_embed_rescale,
        use_post_transformer_norm=True,
        use_fc_norm=num_classes > 0,
        dynamic_img_size=True,
    )


def timm_model(model_args: dict, layer_norm_eps: float, **kwargs) -> torch.nn.Module:
    return timm.create_model(TIMM_ARCHITECTURE, norm_layer=partial(LayerNorm, eps=layer_norm_eps), **model_args, **kwargs)


def eva_state_dict(model: ViTNepaModel | ViTNepaForImageClassification) -> dict[str, torch.Tensor]:
    """NEPA's tensors under Eva's names: q/k/v concatenated into qkv (gate before up for the gated MLP),
    QK-norm weights that NEPA does not learn as ones and zeros."""
    config = model.config
    encoder = model if isinstance(model, ViTNepaModel) else model.vit_nepa
    source = encoder.state_dict()
    head_dim = config.hidden_size // config.num_attention_heads
    state = {
        "cls_token": source["embeddings.cls_token"],
        "patch_embed.proj.weight": source["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": source["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": source["layernorm.weight"],
        "norm.bias": source["layernorm.bias"],
    }
    for i in range(config.num_hidden_layers):
        layer, block = f"encoder.layer.{i}.", f"blocks.{i}."
        attention = layer + "attention.attention."
        renamed = {
            "norm1": "layernorm_before", "norm2": "layernorm_after",
            "attn.proj": "attention.output.dense", "mlp.fc2": "output.dense",
        }  # fmt: skip
        for eva, nepa in renamed.items():
            for kind in ("weight", "bias"):
                state[f"{block}{eva}.{kind}"] = source[f"{layer}{nepa}.{kind}"]
        kinds = ("weight", "bias") if config.qkv_bias else ("weight",)
        for kind in kinds:
            state[f"{block}attn.qkv.{kind}"] = torch.cat([source[f"{attention}{part}.{kind}"] for part in ("query", "key", "value")])
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                state[f"{block}attn.{norm}.weight"] = source.get(f"{attention}{norm}.weight", torch.ones(head_dim))
                state[f"{block}attn.{norm}.bias"] = source.get(f"{attention}{norm}.bias", torch.zeros(head_dim))
        fc1 = ["intermediate.gate_proj", "intermediate.up_proj"] if config.use_gated_mlp else ["intermediate.up_proj"]
        for kind in ("weight", "bias"):
            state[f"{block}mlp.fc1.{kind}"] = torch.cat([source[f"{layer}{name}.{kind}"] for name in fc1])
        for gamma, lambda1 in (("gamma_1", "layer_scale.lambda1"), ("gamma_2", "output.layer_scale.lambda1")):
            state[f"{block}{gamma}"] = source.get(f"{layer}{lambda1}", torch.ones(config.hidden_size))
    if isinstance(model, ViTNepaForImageClassification):
        classifier = model.state_dict()
        for eva, nepa in (("fc_norm", "fc_norm"), ("head", "classifier")):
            for kind in ("weight", "bias"):
                state[f"{eva}.{kind}"] = classifier[f"{nepa}.{kind}"]
    return {name: tensor.detach().float().contiguous() for name, tensor in state.items()}


def load_nepa(folder: str) -> ViTNepaModel | ViTNepaForImageClassification:
    """A classifier folder as a classifier, any other NEPA folder (pretraining, encoder) as its encoder."""
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != ViTNepaConfig.model_type:
        raise ValueError(f"{folder} holds a {config.model_type!r} model, not a NEPA one.")
    if not (Path(folder) / "preprocessor_config.json").is_file():
        raise ValueError(
            f"{folder} has no preprocessor_config.json, so timm's mean, std and input size would be guesses: copy in "
            f"the one the model was trained with (configs/finetune/*/preprocessor_config.json for the released models)."
        )
    classifier = "ViTNepaForImageClassification" in (config.architectures or [])
    check_exportable(config, classifier)
    model_class, tensors = (ViTNepaForImageClassification, "classifier") if classifier else (ViTNepaModel, "encoder")
    instead = "check that config.json matches the saved tensors."
    return load_model(model_class, folder, "--model_name_or_path", tensors, instead, dtype=torch.float32).eval()


def select_weights(model: ViTNepaModel | ViTNepaForImageClassification, folder: str, raw_weights: bool) -> str:
    """Put the folder's EMA weights (model_ema.safetensors, the weights the fine-tuning recipe selects and reports)
    into `model`, unless `raw_weights` or the folder has none; return the name of the file exported."""
    ema_file = Path(folder) / EMA_WEIGHTS_NAME
    if raw_weights or not ema_file.is_file():
        return "model.safetensors"
    state = load_file(ema_file)
    if isinstance(model, ViTNepaModel):  # an encoder read from a pretraining folder, whose names carry the prefix
        state = {key.removeprefix("vit_nepa."): tensor for key, tensor in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{ema_file} does not fit the model ({error}); pass --raw_weights True to export model.safetensors.") from error
    return EMA_WEIGHTS_NAME


def timm_pretrained_cfg(config: ViTNepaConfig, num_classes: int, folder: str) -> dict:
    """What timm's data pipeline reads (input size, normalisation, interpolation) and the class names."""
    cfg = dict(
        input_size=[config.num_channels, config.image_size, config.image_size],
        crop_pct=1.0,
        num_classes=num_classes,
        first_conv="patch_embed.proj",
        classifier="head",
    )
    processor = AutoImageProcessor.from_pretrained(folder)
    cfg.update(mean=list(processor.image_mean), std=list(processor.image_std))
    cfg["interpolation"] = PIL_TO_TIMM_INTERPOLATION.get(int(getattr(processor, "resample", 3)), "bicubic")
    if num_classes:
        cfg["label_names"] = [config.id2label[i] for i in range(num_classes)]
    return cfg


def export(folder: str, output_dir: str, raw_weights: bool = False) -> Path:
    model = load_nepa(folder)
    weights = select_weights(model, folder, raw_weights)
    config = model.config
    num_classes = config.num_labels if isinstance(model, ViTNepaForImageClassification) else 0
    model_args = eva_arguments(config, num_classes)
    eva = timm_model(model_args, config.layer_norm_eps)
    eva.load_state_dict(eva_state_dict(model), strict=True)  # every Eva tensor is set, none left over

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    save_file(eva.state_dict(), output / "model.safetensors")
    timm_config = dict(
        architecture=TIMM_ARCHITECTURE,
        num_classes=num_classes,
        num_features=config.hidden_size,
        global_pool="avg",
        model_args=model_args,
        pretrained_cfg=timm_pretrained_cfg(config, num_classes, folder),
        # Not read by timm: pass norm_layer=functools.partial(timm.layers.LayerNorm, eps=layer_norm_eps).
        layer_norm_eps=config.layer_norm_eps,
        nepa_weights=weights,  # which file of the NEPA folder was exported
    )
    (output / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
    return output


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a local NEPA folder (classifier, fine-tuned or encoder)")
    parser.add_argument("--output_dir", required=True, help="where to write the timm folder")
    add_bool_argument(
        parser, "--raw_weights", f"export model.safetensors even when the folder has EMA weights ({EMA_WEIGHTS_NAME}, exported by default)"
    )
    args = parser.parse_args(argv)
    try:
        output = export(local_folder(args.model_name_or_path, "--model_name_or_path"), args.output_dir, args.raw_weights)
    except (OSError, ValueError) as error:  # FileNotFoundError is an OSError
        raise SystemExit(f"error: {error}") from error
    written = json.loads((output / "config.json").read_text())
    eps, weights = written["layer_norm_eps"], written["nepa_weights"]
    if weights == EMA_WEIGHTS_NAME:
        print(f"exported the EMA weights ({weights}); --raw_weights True exports model.safetensors instead")
    else:
        print(f"exported the raw weights (model.safetensors){'' if args.raw_weights else '; the folder has no EMA weights'}")
    print(f"wrote {os.path.abspath(output)}; load it with")
    print(f'  timm.create_model("local-dir:{output}", pretrained=True, norm_layer=functools.partial(timm.layers.LayerNorm, eps={eps}))')
    return output


if __name__ == "__main__":
    main()
