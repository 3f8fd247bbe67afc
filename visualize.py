"""Pictures of what a ViT-NEPA checkpoint does, and of how its training went.

For a query patch, the paper's two analysis maps: where the query token attends, and how similar the
model's prediction at the query (the predicted embedding of the NEXT patch) is to every patch embedding:

    python visualize.py --model_name_or_path DIR --image cat.jpg [--image ...] --output_dir maps \
        [--query_index 5 | --query_rowcol 7,8] [--layer -1 | --layer all] [--heads mean|max]

The curves logged by a Trainer run (loss, learning rate, target cosine, eval accuracy, ...):

    python visualize.py --trainer_state OUT/trainer_state.json --output_dir plots

Everything runs offline: download a released checkpoint first, e.g.
`hf download SixAILab/nepa-base-patch14-224 --local-dir DIR`, and pass DIR.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoImageProcessor, ViTImageProcessor  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from models.vit_nepa import ViTNepaModel  # noqa: E402
from nepa import checkpoint  # noqa: E402
from nepa.args import Use, parse_flags  # noqa: E402
from nepa.data import BadImageError, open_rgb_pil  # noqa: E402

CURVE_METRICS = ("loss", "learning_rate", "target_cosine", "grad_norm", "eval_loss", "eval_accuracy", "eval_ema_accuracy")


def load_model(path: str | Path) -> ViTNepaModel:
    """The ViT-NEPA encoder of a saved pretraining, classifier or bare-encoder folder, in eval mode."""
    # Head folders store the encoder as `vit_nepa.*`; base_model_prefix strips it, and the head weights are ignored.
    instead = "check that config.json matches the saved tensors."
    return checkpoint.load_model(ViTNepaModel, path, "--model_name_or_path", "encoder", instead, dtype=torch.float32).eval()


def load_image_processor(folder: str | Path, config) -> ViTImageProcessor:
    """The folder's image processor when it has one, else a resize to config.image_size with mean = std = 0.5."""
    if (Path(folder) / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(folder)
        kind, mean, std = type(processor).__name__, processor.image_mean, processor.image_std
        print(f"preprocessing: {folder}/preprocessor_config.json ({kind}, mean {mean}, std {std})")
        return processor
    height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    print(f"preprocessing: no preprocessor_config.json in {folder}; resize to config image_size {height}x{width}, "
          "mean = std = 0.5")
    return ViTImageProcessor(size={"height": height, "width": width}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def load_image(path: str | Path) -> Image.Image:
    """Any image file as RGB, decoded as training decodes it (`nepa.data.open_rgb_pil`: 16-bit keeps its top 8 bits)."""
    try:
        return open_rgb_pil({"path": str(path), "bytes": None})
    except BadImageError as error:
        raise ValueError(f"cannot open image {str(path)!r}: {error}") from error


def attention_map(
    attentions: tuple[torch.Tensor, ...], query: int, layer: int | str = -1, heads: str = "mean"
) -> torch.Tensor:
    """Attention of query patch `query` (token 1 + query) over all tokens, CLS first: (batch, 1 + patches).

    `layer` picks one layer (negative counts from the end) or "all" for the mean over layers; `heads` reduces
    the heads of each layer by "mean" (each row still sums to 1) or "max".
    """
    if layer == "all":
        chosen = attentions
    elif isinstance(layer, int) and -len(attentions) <= layer < len(attentions):
        chosen = (attentions[layer],)
    else:
        count = len(attentions)
        raise ValueError(f"--layer must be 'all' or an index in [-{count}, {count - 1}], got {layer!r}.")
    rows = torch.stack(chosen)[:, :, :, 1 + query].float()  # (layers, batch, heads, tokens)
    if heads == "mean":
        rows = rows.mean(dim=2)
    elif heads == "max":
        rows = rows.amax(dim=2)
    else:
        raise ValueError(f"--heads must be 'mean' or 'max', got {heads!r}.")
    return rows.mean(dim=0)


def next_embedding_similarity(
    last_hidden_state: torch.Tensor, input_embeddings: torch.Tensor, query: int
) -> torch.Tensor:
    """Cosine between the prediction at query patch `query` (its guess of the next patch's embedding) and every
    patch embedding: (batch, patches)."""
    prediction = last_hidden_state[:, 1 + query, None].float()
    return F.cosine_similarity(prediction, input_embeddings[:, 1:].float(), dim=-1)


def outline(ax, index: int, cols: int, patch_size: int, color: str) -> None:
    row, col = divmod(index, cols)
    corner = (col * patch_size, row * patch_size)
    ax.add_patch(Rectangle(corner, patch_size, patch_size, fill=False, edgecolor=color, linewidth=2))


def plot_maps(
    image: np.ndarray,
    attention: np.ndarray,
    similarity: np.ndarray,
    query: int,
    patch_size: int,
    titles: tuple[str, str, str],
    path: str | Path,
) -> Path:
    """Three panels: the input with the query outlined, the attention grid and the similarity grid over it."""
    height, width = image.shape[:2]
    rows, cols = attention.shape
    extent = (0, width, height, 0)  # image and patch grids share pixel coordinates
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    for ax, title in zip(axes, titles):
        ax.imshow(image, extent=extent)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    for ax, grid, cmap in ((axes[1], attention, "inferno"), (axes[2], similarity, "viridis")):
        # Nearest upsampling keeps patch borders visible, so zeros (e.g. causal masking) stay exact.
        overlay = ax.imshow(grid, cmap=cmap, alpha=0.6, extent=extent, interpolation="nearest")
        fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.04)
    outline(axes[0], query, cols, patch_size, "cyan")
    outline(axes[1], query, cols, patch_size, "cyan")
    if query + 1 < rows * cols:
        outline(axes[2], query + 1, cols, patch_size, "red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def resolve_query(query_index: int | None, query_rowcol: tuple[int, int] | None, rows: int, cols: int) -> int:
    """The query's patch index in raster order; the central patch by default."""
    if query_rowcol is not None:
        row, col = query_rowcol
        if not (0 <= row < rows and 0 <= col < cols):
            raise ValueError(f"--query_rowcol {row},{col} lies outside the {rows}x{cols} patch grid (0-based).")
        return row * cols + col
    if query_index is None:
        return (rows // 2) * cols + cols // 2
    if not 0 <= query_index < rows * cols:
        raise ValueError(f"--query_index {query_index} lies outside the {rows * cols} patches (0..{rows * cols - 1}).")
    return query_index


@torch.no_grad()
def visualize_image(
    model: ViTNepaModel,
    processor,
    image_path: str | Path,
    output_dir: str | Path,
    query_index: int | None = None,
    query_rowcol: tuple[int, int] | None = None,
    layer: int | str = -1,
    heads: str = "mean",
) -> Path:
    """Preprocess one image, run the model with attention probabilities, and write its three-panel PNG."""
    pixel_values = processor(images=load_image(image_path), return_tensors="pt").pixel_values.to(model.device)
    patch_size = model.config.patch_size
    rows, cols = pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size
    query = resolve_query(query_index, query_rowcol, rows, cols)
    outputs = model(pixel_values, output_attentions=True)
    attention = attention_map(outputs.attentions, query, layer, heads)[0].cpu()
    similarity = next_embedding_similarity(outputs.last_hidden_state, outputs.input_embeddings, query)[0].cpu()

    image = pixel_values[0].permute(1, 2, 0).float().cpu().numpy()
    if processor.do_normalize:
        image = image * np.asarray(processor.image_std) + np.asarray(processor.image_mean)
    row, col = divmod(query, cols)
    layers = f"mean of {len(outputs.attentions)} layers" if layer == "all" else f"layer {layer}"
    next_patch = f"next patch {query + 1} outlined" if query + 1 < rows * cols else "last patch: predicts past the end"
    titles = (
        f"{Path(image_path).name} at {image.shape[1]}x{image.shape[0]}\nquery patch {query} (row {row}, col {col})",
        f"attention of query {query}: {layers}, {heads} over heads\n(CLS weight {attention[0]:.2f}, not shown)",
        f"cosine(prediction at {query}, patch embeddings)\n{next_patch}",
    )
    attention_grid = attention[1:].reshape(rows, cols).numpy()
    similarity_grid = similarity.reshape(rows, cols).numpy()
    path = Path(output_dir) / f"{Path(image_path).stem}_q{query}.png"
    return plot_maps(np.clip(image, 0, 1), attention_grid, similarity_grid, query, patch_size, titles, path)


def plot_training_curves(trainer_state: str | Path, output_dir: str | Path) -> Path:
    """One subplot per logged metric of CURVE_METRICS against the step, to output_dir/training_curves.png."""
    state_file = Path(trainer_state)
    if not state_file.is_file():
        raise ValueError(
            f"{state_file} not found: pass the trainer_state.json of a Trainer output_dir or checkpoint-N folder."
        )
    try:
        history = json.loads(state_file.read_text()).get("log_history", [])
    except json.JSONDecodeError as error:
        raise ValueError(f"{state_file} is not valid JSON: {error}") from error
    present = [metric for metric in CURVE_METRICS if any(metric in entry and "step" in entry for entry in history)]
    if not present:
        raise ValueError(f"the log_history of {state_file} has none of {', '.join(CURVE_METRICS)}: nothing to plot.")

    cols = min(len(present), 4)
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, present):
        logged = [entry for entry in history if metric in entry and "step" in entry]
        steps, values = [entry["step"] for entry in logged], [entry[metric] for entry in logged]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(output_dir) / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_layer(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer layer index or 'all', got {text!r}") from None


def parse_rowcol(text: str) -> tuple[int, int]:
    try:
        row, col = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROW,COL (0-based integers), got {text!r}") from None
    return row, col


MAPS = Use("is used only for attention maps (--model_name_or_path with --image)", lambda a: a.model_name_or_path is not None)
# Where each flag applies (nepa.args.parse_flags refuses it elsewhere); the others apply to every run.
FLAG_USES = dict.fromkeys(("query_index", "query_rowcol", "layer", "heads"), MAPS)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", help="a local ViT-NEPA folder (pretraining or classifier)")
    parser.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    query = parser.add_mutually_exclusive_group()
    query.add_argument("--query_index", type=int, help="query patch index, 0-based in raster order")
    query.add_argument("--query_rowcol", type=parse_rowcol, help="query patch as ROW,COL (0-based); default: central")
    parser.add_argument("--layer", type=parse_layer, default=-1, help="layer index (negative from the end) or 'all' (mean)")
    parser.add_argument("--heads", choices=("mean", "max"), default="mean", help="how the heads of a layer are combined")
    parser.add_argument("--trainer_state", help="a trainer_state.json whose log_history to plot")
    parser.add_argument("--output_dir", required=True)
    args = parse_flags(parser, argv, FLAG_USES)
    if args.model_name_or_path is None and args.trainer_state is None:
        parser.error("give --model_name_or_path with --image (maps), or --trainer_state (curves), or both.")
    if (args.model_name_or_path is None) != (not args.image):
        parser.error("--model_name_or_path and --image go together.")
    stems = [Path(image).stem for image in args.image]
    if len(set(stems)) < len(stems):
        parser.error(f"images share a file stem, so their PNGs would overwrite each other: {stems}; rename them.")
    return args


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a classifier's encoder load reports the head weights it skips; expected here
    written = []
    try:
        if args.trainer_state is not None:
            written.append(plot_training_curves(args.trainer_state, args.output_dir))
            print(f"wrote {written[-1]}")
        if args.model_name_or_path is not None:
            model = load_model(args.model_name_or_path)
            model.to("cuda" if torch.cuda.is_available() else "cpu")
            processor = load_image_processor(args.model_name_or_path, model.config)
            choices = dict(query_index=args.query_index, query_rowcol=args.query_rowcol, layer=args.layer, heads=args.heads)
            for image in args.image:
                written.append(visualize_image(model, processor, image, args.output_dir, **choices))
                print(f"wrote {written[-1]}")
    except (OSError, ValueError) as error:  # FileNotFoundError is an OSError
        raise SystemExit(f"error: {error}") from error
    finally:
        hf_logging.set_verbosity(verbosity)
    return written


if __name__ == "__main__":
    main()
