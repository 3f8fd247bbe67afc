"""GPU memory of NEPA-L/14 pretraining per device, measured at small size on the CPU and scaled on paper.

    .venv/bin/python -m bench.memory          # about two minutes on 2 cores
    .venv/bin/python -m bench.memory --config configs/pretrain/nepa-base-patch14-224

Measured: the bytes autograd keeps for the backward pass (the activations; distinct storages counted once) per
image, for the config cut to 1 and to 2 layers, under bf16 autocast as the recipes train, with and without
activation checkpointing (`--activation_checkpointing True`, Transformers' non-reentrant checkpoint per layer); the
difference between 2 layers and 1 is one layer's share. Scaled on paper to the config's depth, for a per-device
batch B:
    without checkpointing   state + B * (outside + L * layer)
    with checkpointing      state + B * (outside + L * kept + layer)   (one layer's activations rebuilt at a time)
(each term also has a part that does not grow with B: autocast's bf16 copies of the weights) where state is the
fp32 weights, gradients, AdamW's two moments and the EMA (20 bytes a parameter). Left out: the CUDA context and
allocator slack (a few GB), and the transient tensors of a backward step.
"""

import argparse
from pathlib import Path

import torch

from models.vit_nepa import ViTNepaConfig, ViTNepaForPreTraining

ROOT = Path(__file__).resolve().parents[1]

STATE_BYTES_PER_PARAMETER = 4 + 4 + 8 + 4  # weights, gradients, AdamW moments, EMA, all fp32
GB = 1e9


def saved_bytes(config: ViTNepaConfig, layers: int, batch: int, checkpointing: bool) -> int:
    """Bytes held for the backward pass after one forward of `batch` images."""
    config = ViTNepaConfig.from_dict({**config.to_dict(), "num_hidden_layers": layers, "out_features": None, "out_indices": None})
    torch.manual_seed(0)
    model = ViTNepaForPreTraining(config).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    pixels = torch.randn(batch, config.num_channels, config.image_size, config.image_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), torch.autocast("cpu", torch.bfloat16):
        loss = model(pixel_values=pixels).loss
    loss.backward()
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in parameters)  # weights are counted in state


def fit(config: ViTNepaConfig, checkpointing: bool) -> tuple[float, float, float, float]:
    """Held bytes = fixed + images * outside + layers * (per_layer + images * per_layer_image), from 1 and 2 layers at
    1 and 2 images (the fixed parts are the bf16 copies of the weights that autocast keeps). In GB."""
    s = {(layers, images): saved_bytes(config, layers, images, checkpointing) / GB for layers in (1, 2) for images in (1, 2)}
    per_layer_image = s[2, 2] - s[1, 2] - s[2, 1] + s[1, 1]
    per_layer = s[2, 1] - s[1, 1] - per_layer_image
    outside = s[1, 2] - s[1, 1] - per_layer_image
    fixed = s[1, 1] - outside - per_layer - per_layer_image
    return fixed, outside, per_layer, per_layer_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/pretrain/nepa-large-patch14-224"))
    parser.add_argument("--per_device", type=int, nargs="+", default=[16, 32, 64, 128])
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    config = ViTNepaConfig.from_pretrained(args.config)
    depth = config.num_hidden_layers
    parameters = ViTNepaForPreTraining(config).num_parameters()
    state = parameters * STATE_BYTES_PER_PARAMETER / GB
    print(f"{Path(args.config).name}: {parameters / 1e6:.1f} M parameters, {depth} layers; state {state:.2f} GB")
    measured = {checkpointing: fit(config, checkpointing) for checkpointing in (False, True)}
    for checkpointing, (fixed, outside, per_layer, per_layer_image) in measured.items():
        print(
            f"measured {'with' if checkpointing else 'without'} checkpointing: per layer {per_layer * 1e3:.1f} MB + "
            f"{per_layer_image * 1e3:.2f} MB an image; outside the layers {fixed * 1e3:.1f} MB + {outside * 1e3:.2f} MB an image"
        )
    fixed, outside, per_layer, per_layer_image = measured[False]
    kept = measured[True]
    print("| per-device batch | without checkpointing (GB) | with checkpointing (GB) |\n|---|---|---|")
    for batch in args.per_device:
        plain = state + fixed + depth * per_layer + batch * (outside + depth * per_layer_image)
        rebuilt = per_layer + batch * per_layer_image  # the one layer whose activations the backward pass rebuilds
        checkpointed = state + kept[0] + depth * kept[2] + batch * (kept[1] + depth * kept[3]) + rebuilt
        print(f"| {batch} | {plain:.1f} | {checkpointed:.1f} |")


if __name__ == "__main__":
    main()
