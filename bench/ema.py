"""Milliseconds per EMA update of ViT-B/14 and ViT-L/14 classifier weights: per-tensor loops over `state_dict()`
against the project's `nepa.ema.ModelEMA.update()` (one `torch._foreach_lerp_` over all tensors).

    .venv/bin/python -m bench.ema                       # about 2 minutes on 2 busy cores
    .venv/bin/python -m bench.ema --threads 1
    .venv/bin/python -m bench.ema --device cuda

Two loops: timm's `ModelEmaV2.update()` as the field runs it (out of place: `ema.copy_(d * ema + (1 - d) * w)` per
tensor), and the fastest per-tensor loop (in place: `ema.mul_(d).add_(w, alpha=1 - d)`). Two more columns bound what
any update with the same numerics could do: `_foreach_mul_` + `_foreach_add_` (the
loop's arithmetic in multi-tensor form) and one `lerp_` over the weights and the average each held in a single
contiguous buffer (one kernel, the fewest bytes moved; a model's parameters are not laid out like that).
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from timm.utils import ModelEmaV2

from models.vit_nepa import ViTNepaConfig, ViTNepaForImageClassification
from nepa.ema import ModelEMA

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "ViT-B/14": ROOT / "configs/finetune/nepa-base-patch14-224-sft",
    "ViT-L/14": ROOT / "configs/finetune/nepa-large-patch14-224-sft",
}


class InPlaceLoopEMA:
    """Walk the model's state dict every step, two in-place ops per tensor."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = model
        self.decay = decay
        self.shadow = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point():
                self.shadow[name].mul_(self.decay).add_(tensor, alpha=1 - self.decay)


class ForeachMulAddEMA:
    """The loop's arithmetic as two multi-tensor ops."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema
        self.shadow = [tensor.clone() for tensor in ema.shadow]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_mul_(self.shadow, self.ema.decay)
        torch._foreach_add_(self.shadow, self.ema.live, alpha=1 - self.ema.decay)


class FlatEMA:
    """Weights and average each in one contiguous buffer: a single `lerp_`."""

    def __init__(self, ema: ModelEMA):
        self.decay = ema.decay
        self.live = torch.cat([tensor.flatten() for tensor in ema.live])
        self.shadow = self.live.clone()

    @torch.no_grad()
    def update(self) -> None:
        self.shadow.lerp_(self.live, 1 - self.decay)


def median_ms(updates: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds per call of each update, after one warm-up call; the updates interleave per repeat."""
    seconds = {name: [] for name in updates}
    for update in updates.values():
        update()
    for _ in range(repeats):
        for name, update in updates.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            update()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in seconds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=7, help="timed updates per implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--decay", type=float, default=0.9999)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here; run on a GPU machine or use --device cpu.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"torch {torch.__version__}, {where}, decay {args.decay}, median of {args.repeats} updates\n")

    print(
        "| weights | tensors | parameters | timm ModelEmaV2 ms | in-place loop ms | ModelEMA.update() ms "
        "| timm / ModelEMA | in-place loop / ModelEMA | _foreach_mul_ + _foreach_add_ ms | one flat lerp_ ms |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name in args.models:
        model = ViTNepaForImageClassification(ViTNepaConfig.from_pretrained(CONFIGS[name])).to(device)
        project = ModelEMA(model, args.decay)
        timm_ema = ModelEmaV2(model, args.decay)
        updates = {
            "timm": lambda: timm_ema.update(model),
            "loop": InPlaceLoopEMA(model, args.decay).update,
            "project": project.update,
            "foreach_mul_add": ForeachMulAddEMA(project).update,
            "flat": FlatEMA(project).update,
        }
        ms = median_ms(updates, args.repeats, device)
        parameters = sum(tensor.numel() for tensor in project.live)
        print(
            f"| {name} | {len(project.live)} | {parameters / 1e6:.0f} M | {ms['timm']:.1f} | {ms['loop']:.1f} "
            f"| {ms['project']:.1f} | {ms['timm'] / ms['project']:.2f}x | {ms['loop'] / ms['project']:.2f}x "
            f"| {ms['foreach_mul_add']:.1f} | {ms['flat']:.1f} |",
            flush=True,
        )
        del model, project, timm_ema, updates


if __name__ == "__main__":
    main()
