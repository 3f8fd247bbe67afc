"""The cost of `train_pretrain.py --knn_eval_steps`: the miniature's pretraining (experiments/miniature.py) with and
without the k-NN monitor, alternating in one process, no dataloader workers, so that the process's CPU time is the
whole work. Prints each run's time, the monitor's time per evaluation, its images per second (bank and queries
through the encoder's forward, dataloading included) beside the training's, and the share of training time it
adds (docs/performance.md scales it to ViT-B on 8 H100s).

    .venv/bin/python -m bench.knn_monitor --threads 1
"""

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import train_pretrain
from experiments.miniature import DATASET, EVAL, PRETRAIN, pretrain_argv


def timed_run(argv: list[str]) -> float:
    start = time.process_time()
    train_pretrain.main(argv)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="Pretraining steps of each run.")
    parser.add_argument("--knn_eval_steps", type=int, default=50)
    parser.add_argument("--knn_train_samples", type=int, default=10_000)
    parser.add_argument("--knn_eval_samples", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=2, help="Pairs of runs (without, with), alternating.")
    parser.add_argument("--dataset", default=DATASET)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    monitor = [
        "--knn_eval_steps", str(args.knn_eval_steps), "--knn_train_samples", str(args.knn_train_samples),
        "--knn_eval_samples", str(args.knn_eval_samples), "--knn_crop_pct", str(EVAL["crop_pct"]),
        "--per_device_eval_batch_size", str(EVAL["per_device_eval_batch_size"]),
    ]  # fmt: skip
    common = ["--report_to", "none", "--disable_tqdm", "True", "--dataloader_num_workers", "0", "--use_cpu"]
    times = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for name, extra in (("without", []), ("with", monitor)):
                output_dir = Path(folder) / f"{name}-{repeat}"
                argv = pretrain_argv(output_dir, args.steps, dataset=args.dataset, logging_steps=args.steps) + common + extra
                times[name].append(timed_run(argv))
                print(f"{name} monitor, run {repeat + 1}: {times[name][-1]:.1f} s CPU", flush=True)

    evaluations = math.ceil(args.steps / args.knn_eval_steps)  # every knn_eval_steps, and after the last step
    images = args.knn_train_samples + args.knn_eval_samples
    training_images = args.steps * PRETRAIN["per_device_train_batch_size"]
    print(f"\n{args.steps} steps of batch {PRETRAIN['per_device_train_batch_size']}, {evaluations} evaluations of "
          f"{args.knn_train_samples} + {args.knn_eval_samples} images, {torch.get_num_threads()} thread(s), CPU time")  # fmt: skip
    pairs = list(zip(times["without"], times["with"]))
    for without, watched in pairs:
        extra = watched - without
        print(
            f"without {without:.1f} s, with {watched:.1f} s: +{100 * extra / without:.1f} %; "
            f"{extra / evaluations:.2f} s per evaluation; monitor {evaluations * images / extra:,.0f} images/s, "
            f"training {training_images / without:,.0f} images/s"
        )
    median_extra = statistics.median(watched - without for without, watched in pairs)
    print(f"median: {median_extra / evaluations:.2f} s per evaluation, monitor {evaluations * images / median_extra:,.0f} images/s")


if __name__ == "__main__":
    main()
