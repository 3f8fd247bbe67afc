"""Images per second of each frozen-encoder protocol (nepa/probes.py), the model's work alone (random pixels, no
dataloader), and the matmul FLOPs per image that scale it to ViT-B/14 and ViT-L/14 (docs/performance.md).

    .venv/bin/python -m bench.probes --threads 1                                   # the miniature's tiny encoder
    .venv/bin/python -m bench.probes --config configs/pretrain/nepa-base-patch14-224 --device cuda --bf16

- k-NN, encoding: the encoder's forward on a batch (every train and validation image goes through it once);
- k-NN, scoring: queries against a feature bank of `--bank` images (one process's shard), top-k;
- linear: one optimiser step of the default grid (8 learning rates x mean / CLS / last-4 features, SGD) on one
  forward of the frozen encoder;
- attentive: one step of the default attentive grid (7 heads over the last `--blocks` blocks' tokens, AdamW).
Each figure is the median over `--rounds` timed batches after two warm-up batches. On the CPU with one thread the
time is the thread's CPU time (what a core of its own would take, as in bench/data_pipeline.py), else wall time.
"""

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from models.vit_nepa import ViTNepaConfig, ViTNepaModel
from nepa.probes import ATTENTIVE_LRS, LINEAR_LRS, KnnBank, ProbeGrid

ROOT = Path(__file__).resolve().parents[1]


def forward_gflop(config: ViTNepaConfig, heads: int = 0, train_heads: bool = False) -> float:
    """Matmul GFLOP per image of the encoder's forward, plus `heads` attentive heads' key / value projections
    (forward and backward when `train_heads`); the linear heads' are negligible."""
    tokens = 1 + (config.image_size // config.patch_size) ** 2
    width, mlp = config.hidden_size, config.intermediate_size
    per_layer = tokens * (2 * 4 * width * width + 2 * 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    embed = 2 * (tokens - 1) * config.num_channels * config.patch_size**2 * width
    encoder = config.num_hidden_layers * per_layer + embed
    attentive = heads * 2 * 2 * (tokens - 1) * width * width * (3 if train_heads else 1)
    return (encoder + attentive) / 1e9


def median_rate(step, images: int, rounds: int, clock) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(rounds):
        start = clock()
        step()
        times.append(clock() - start)
    return images / statistics.median(times)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/pretrain/nepa-tiny-patch7-28"))
    parser.add_argument("--batch", type=int, default=128, help="images per step (the probes' per-device batch)")
    parser.add_argument("--bank", type=int, default=60000, help="k-NN: feature-bank rows of one process")
    parser.add_argument("--blocks", type=int, default=2, help="attentive probe: the last K blocks")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16, as the recipes run")
    return parser.parse_args()


def measure_rows(args, device: torch.device, clock) -> list[tuple[str, float, float | None]]:
    """(protocol, images/s, matmul GFLOP per image) of k-NN's encoding and scoring and of one step of each grid."""
    config = ViTNepaConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    encoder = ViTNepaModel(config).to(device).requires_grad_(False).eval()
    pixels = torch.randn(args.batch, config.num_channels, config.image_size, config.image_size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    rows = []

    def encode():
        with torch.no_grad(), autocast:
            encoder(pixels)
        sync()

    rows.append(("k-NN, encoding", median_rate(encode, args.batch, args.rounds, clock), forward_gflop(config)))

    dtype = torch.float32 if device.type == "cpu" else torch.float16
    bank_features = torch.nn.functional.normalize(torch.randn(args.bank, config.hidden_size, device=device), dim=-1)
    bank = KnnBank(bank_features.to(dtype), torch.randint(0, 10, (args.bank,), device=device), 10)
    queries = torch.nn.functional.normalize(torch.randn(args.batch, config.hidden_size, device=device), dim=-1)

    def score():
        bank.local_neighbours(queries, 20)
        sync()

    rows.append((f"k-NN, scoring against {args.bank} images", median_rate(score, args.batch, args.rounds, clock), None))

    grids = {
        "linear": (ProbeGrid(encoder, "linear", 10, LINEAR_LRS), torch.optim.SGD, {"momentum": 0.9}),
        "attentive": (ProbeGrid(encoder, "attentive", 10, ATTENTIVE_LRS, blocks=(args.blocks,)), torch.optim.AdamW, {}),
    }
    for name, (grid, optimizer_cls, kwargs) in grids.items():
        grid.to(device).train()
        optimizer = optimizer_cls([p for p in grid.parameters() if p.requires_grad], lr=1e-3, **kwargs)

        def step():
            with autocast:
                loss = grid(pixels, labels)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()

        heads = len(grid.heads) if name == "attentive" else 0
        flops = forward_gflop(config, heads, train_heads=True)
        rows.append((f"{name} probe, {len(grid.heads)} heads", median_rate(step, args.batch, args.rounds, clock), flops))
    return rows


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu_time = device.type == "cpu" and torch.get_num_threads() == 1
    rows = measure_rows(args, device, time.thread_time if cpu_time else time.perf_counter)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"{Path(args.config).name}, batch {args.batch}, {device}" + (f", {threads} threads" if threads else "") + (", bf16" if args.bf16 else "")
          + (", CPU time" if cpu_time else ", wall time"))
    print("| protocol | images/s | matmul GFLOP per image |")
    print("|---|---|---|")
    for name, rate, flops in rows:
        print(f"| {name} | {rate:,.0f} | {'' if flops is None else f'{flops:.3g}'} |")
    for name in ("nepa-base-patch14-224", "nepa-large-patch14-224"):
        big = ViTNepaConfig.from_pretrained(ROOT / "configs/pretrain" / name)
        print(
            f"{name}: forward {forward_gflop(big):.1f} GFLOP per image; attentive grid (7 heads, trained) adds "
            f"{forward_gflop(big, 7, True) - forward_gflop(big):.1f}"
        )


if __name__ == "__main__":
    main()
