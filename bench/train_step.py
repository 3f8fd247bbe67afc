"""Speed of one NEPA training step: images/s, model-FLOPs utilisation and peak memory.

One step is forward, backward, AdamW step and zero_grad, for the pretraining model (NEPA loss) and
the fine-tuning classifier (cross-entropy on random labels). Every configuration runs in a fresh
subprocess, so that its peak memory is its own and a failing `torch.compile` costs only its row.
The matmul peak that MFU is measured against is timed by the same subprocesses, on the same device
with the same threads, and the best figure of the run is kept. Nothing here asserts on time.

    python -m bench.train_step                                  # CPU: vit-s-112, batch 32
    python -m bench.train_step --device cuda --sizes vit-b-224,vit-l-224 --dtypes bf16 --grad_ckpt off --compile off,on
                                                                # GPU: the recipes' per-device batches
"""

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from models.vit_nepa import ViTNepaConfig, ViTNepaForImageClassification, ViTNepaForPreTraining

# The released architecture (QK-norm, LayerScale 1e-5, RoPE, GELU MLP, patch 14) at three sizes: the released
# NEPA-B and NEPA-L, and a ViT-S of it at 112 px for the CPU.
SIZES = {
    "vit-s-112": lambda **kwargs: ViTNepaConfig.nepa_base(
        hidden_size=384, num_attention_heads=6, intermediate_size=1536, image_size=112, **kwargs
    ),
    "vit-b-224": ViTNepaConfig.nepa_base,
    "vit-l-224": ViTNepaConfig.nepa_large,
}
# Per-device batch of the recipe scripts on an 80 GB GPU (scripts/pretrain/nepa_*.sh, scripts/finetune/recipe.sh).
RECIPE_GPU_BATCH = {("vit-b-224", "pretrain"): 256, ("vit-b-224", "finetune"): 128,
                    ("vit-l-224", "pretrain"): 128, ("vit-l-224", "finetune"): 128}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a substring of the device name.
DATASHEET_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5, "H200": 989.4, "A100": 312.0}
# The pretraining and -sft release configs differ in attention direction, pooling, QK-norm affine and drop path.
MODELS = {
    "pretrain": (ViTNepaForPreTraining, dict(is_causal=True, qk_norm_affine=False, drop_path_prob=0.0)),
    "finetune": (
        ViTNepaForImageClassification,
        dict(is_causal=False, qk_norm_affine=True, drop_path_prob=0.1, add_pooling_layer=True, num_labels=1000),
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SWITCH = {"off": False, "on": True}


def build_config(model: str, size: str) -> ViTNepaConfig:
    return SIZES[size](**MODELS[model][1])


def training_flops_per_image(config: ViTNepaConfig, with_classifier: bool) -> float:
    """Matmul FLOPs (2 per multiply-add) of forward + backward for one image.

    Counted: patch-embedding conv, Q/K/V and attention-output projections, QK^T and AV over the full
    token square (the causal mask is not discounted), the MLP, and the classifier when there is one.
    Backward costs twice the forward (input and weight gradients), except the patch embedding, whose
    input (the pixels) needs no gradient. Not counted: LayerNorms, softmax, GELU, RoPE, residual
    adds, the losses and the optimiser, all linear in the activations.
    """
    patches = (config.image_size // config.patch_size) ** 2
    tokens = 1 + patches
    hidden, mlp = config.hidden_size, config.intermediate_size
    patch_embed = 2 * patches * config.num_channels * config.patch_size**2 * hidden
    projections = 4 * 2 * tokens * hidden * hidden
    attention = 2 * 2 * tokens * tokens * hidden
    mlp_matmuls = (3 if config.use_gated_mlp else 2) * 2 * tokens * hidden * mlp
    classifier = 2 * hidden * config.num_labels if with_classifier else 0
    per_layer = projections + attention + mlp_matmuls
    return 2 * patch_embed + 3 * (config.num_hidden_layers * per_layer + classifier)


def datasheet_bf16_tflops(device_name: str) -> float | None:
    return next((tflops for key, tflops in DATASHEET_BF16_TFLOPS.items() if key in device_name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Best FLOP/s of large square matmuls in `dtype`: the ceiling the model's matmuls run against."""
    sizes, inner = ((4096, 8192), 20) if device.type == "cuda" else ((2048, 3072), 1)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                a @ b
            synchronize(device)
            best = max(best, inner * 2 * n**3 / (time.perf_counter() - start))
    return best


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}: CPU memory is measured on Linux only; use --device cuda.")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Writing 5 resets the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")


def current_memory(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else proc_status_kib("VmRSS") * 1024


def peak_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status_kib("VmHWM") * 1024


def run_one(spec: dict) -> dict:
    """Time `spec["steps"]` training steps of one configuration in this process."""
    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    torch.manual_seed(0)
    model_class, _ = MODELS[spec["model"]]
    config = build_config(spec["model"], spec["size"])
    model = model_class(config).to(device).train()
    if spec["grad_ckpt"]:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
    forward = torch.compile(model) if spec["compile"] else model
    batch = spec["batch_size"]
    pixel_values = torch.randn(batch, config.num_channels, config.image_size, config.image_size, device=device)
    labels = torch.randint(0, config.num_labels, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if spec["model"] == "pretrain":
                loss = forward(pixel_values).loss
            else:
                loss = forward(pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    synchronize(device)
    memory_before = current_memory(device)
    try:
        for _ in range(spec["warmup"]):
            step()
    except Exception as error:  # a compile failure is a result to report, not a crash
        if not spec["compile"]:
            raise
        return {"error": f"compile failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    synchronize(device)
    reset_peak_memory(device)
    times = []
    for _ in range(spec["steps"]):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    step_memory = peak_memory(device) - memory_before
    return {
        "best_s": min(times),
        "median_s": statistics.median(times),
        "step_memory": step_memory,
        "peak_memory": peak_memory(device),
        "flops_per_image": training_flops_per_image(config, with_classifier=spec["model"] == "finetune"),
        "peak_flops": matmul_peak(dtype, device),
    }


def child_main(spec_json: str) -> None:
    print("RESULT " + json.dumps(run_one(json.loads(spec_json))), flush=True)


def run_in_subprocess(spec: dict) -> dict:
    command = [sys.executable, "-m", "bench.train_step", "--_child", json.dumps(spec)]
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {done.returncode}: {last[:160]}"}


def parse_choices(text: str, allowed, flag: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise SystemExit(
            f"{flag}: unknown value(s) {unknown or text!r}; choose from {', '.join(allowed)} (comma-separated)."
        )
    return values


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes", help=f"comma-separated from {', '.join(SIZES)}; default vit-s-112 on CPU, vit-b-224 on GPU"
    )
    parser.add_argument("--models", default="pretrain,finetune", help=f"comma-separated from {', '.join(MODELS)}")
    parser.add_argument(
        "--batch_size", type=int, help="per step; default 32 on CPU, the recipe's per-device batch on GPU (256 or 128)"
    )
    parser.add_argument(
        "--nominal_tflops", type=float,
        help="bf16 peak for a second MFU column; default on GPU: the datasheet's dense figure for known cards",
    )
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument(
        "--compile", default="off", help="torch.compile the model: off and/or on (on CPU, up to 2 min of compiling per row)"
    )
    parser.add_argument("--grad_ckpt", default="off,on", help="gradient checkpointing: off and/or on")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, optimiser state)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        return args
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no GPU; use --device cpu.")
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be at least 1 (the first step allocates the optimiser state).")
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"--batch_size must be at least 1, got {args.batch_size}.")
    return args


def measure_rows(args, on_gpu: bool) -> list[tuple]:
    """Each configuration of the grid the flags ask for, measured in a process of its own."""
    sizes = parse_choices(args.sizes or ("vit-b-224" if on_gpu else "vit-s-112"), SIZES, "--sizes")
    grid = itertools.product(
        sizes,
        parse_choices(args.models, MODELS, "--models"),
        parse_choices(args.dtypes, DTYPES, "--dtypes"),
        parse_choices(args.compile, SWITCH, "--compile"),
        parse_choices(args.grad_ckpt, SWITCH, "--grad_ckpt"),
    )
    rows = []
    for size, model, dtype, compile_, grad_ckpt in grid:
        batch_size = args.batch_size or (RECIPE_GPU_BATCH.get((size, model), 128) if on_gpu else 32)
        spec = dict(
            device=args.device, size=size, model=model, dtype=dtype, compile=SWITCH[compile_],
            grad_ckpt=SWITCH[grad_ckpt], batch_size=batch_size, steps=args.steps, warmup=args.warmup,
        )
        started = time.perf_counter()
        result = run_in_subprocess(spec)
        outcome = result["error"] if "error" in result else f"best step {result['best_s'] * 1e3:.0f} ms"
        print(f"# {model} {size} {dtype} compile={compile_} grad_ckpt={grad_ckpt}: {outcome} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        rows.append((model, size, dtype, compile_, grad_ckpt, batch_size, result))
    return rows


def print_table(args, rows: list[tuple], device: torch.device) -> None:
    """The device, the matmul peaks, then one table row per configuration, and what the columns mean."""
    on_gpu = device.type == "cuda"
    # MFU against the best matmul throughput any subprocess of this run measured for that dtype.
    peaks = {}
    for _, _, dtype, _, _, _, result in rows:
        if "peak_flops" in result:
            peaks[dtype] = max(peaks.get(dtype, 0.0), result["peak_flops"])
    where = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"Device: {where}; torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up.")
    measured = ", ".join(f"{dtype} {flops / 1e12:.3f} TFLOP/s" for dtype, flops in peaks.items())
    print(f"Matmul peak: {measured or 'none measured'}")
    nominal = args.nominal_tflops or (datasheet_bf16_tflops(where) if on_gpu else None)
    if nominal:
        print(f"Nominal bf16 peak: {nominal} TFLOP/s ({'--nominal_tflops' if args.nominal_tflops else 'dense, datasheet'}).")
    print()
    print(
        "| model | size | dtype | compile | grad ckpt | batch | images/s | step ms (best / median) | TFLOP/s | MFU % "
        f"{'| MFU % of nominal ' if nominal else ''}| step memory MiB | peak memory MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if nominal else ""))
    for model, size, dtype, compile_, grad_ckpt, batch_size, result in rows:
        head = f"| {model} | {size} | {dtype} | {compile_} | {grad_ckpt} | {batch_size} |"
        if "error" in result:
            print(f"{head} {result['error']} | | | | | |" + (" |" if nominal else ""))
            continue
        achieved = result["flops_per_image"] * batch_size / result["best_s"]
        of_nominal = (f"| {100 * achieved / (nominal * 1e12):.1f} " if dtype == "bf16" else "| - ") if nominal else ""
        print(
            f"{head} {batch_size / result['best_s']:.1f} | {result['best_s'] * 1e3:.0f} / {result['median_s'] * 1e3:.0f} "
            f"| {achieved / 1e12:.3f} | {100 * achieved / peaks[dtype]:.1f} {of_nominal}"
            f"| {result['step_memory'] / 2**20:.0f} | {result['peak_memory'] / 2**20:.0f} |"
        )
    print()
    print("images/s, TFLOP/s and MFU use the fastest timed step (the least disturbed on a shared machine);")
    print("MFU % is against the matmul peak measured above, MFU % of nominal against the card's datasheet figure.")
    print("MFU counts model FLOPs only: the forward that gradient checkpointing recomputes is not credited.")
    print("step memory: peak over the timed steps minus what was held before the first step (weights, batch):")
    print("gradients, AdamW state, activations; CUDA max_memory_allocated, or on CPU the process's peak RSS.")
    print("peak memory: the same peak with nothing subtracted.")


def main() -> None:
    args = parse_args()
    if args._child:
        child_main(args._child)
        return
    device = torch.device(args.device)
    print_table(args, measure_rows(args, device.type == "cuda"), device)


if __name__ == "__main__":
    main()
