"""Saved folders: loading them, the one way every entry point does it, and finding the newest complete checkpoint.

Models, configs and image processors load from local folders only, never from the Hugging Face Hub: a Hub id
(the release's `SixAILab/nepa-*`) fails at once with the `hf download` command that makes it a local folder, so a
run never waits on, or silently depends on, the network. Weights must cover the whole model: a tensor the model
needs and the folder lacks is an error that says what to do instead, never a random initialisation.
"""

import json
import logging
from pathlib import Path

from transformers import AutoImageProcessor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)


def local_folder(path: str | Path, flag: str, revision: str | None = None) -> Path:
    """`path` (passed as `flag`) as a local folder; anything else (a Hub id, a typo) fails with the command that
    downloads it."""
    if Path(path).is_dir():
        if revision:
            logger.warning("%s names a Hub revision (%s); %s is a local folder, so whatever it holds is loaded.", flag, revision, path)
        return Path(path)
    revision = f" --revision {revision}" if revision else ""
    raise FileNotFoundError(
        f"{flag} {path} is not a local folder; models load from local folders only. Where there is network, run "
        f"`hf download {path}{revision} --local-dir DIR` and pass {flag} DIR."
    )


def load_model(model_class, path: str | Path, flag: str, tensors: str, instead: str, optional=(), **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` of the local folder `path` (passed as `flag`), which must hold
    a config of the model's type and every tensor the model needs, except names starting with one of `optional`
    (parts meant to start at random). Missing tensors raise a `ValueError` that names them as `tensors` and says
    what to do `instead`."""
    folder = local_folder(path, flag)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass a folder saved by save_pretrained (or a checkpoint-N folder).")
    model_type, expected = json.loads(config_file.read_text()).get("model_type"), model_class.config_class.model_type
    if model_type != expected:
        raise ValueError(f"{config_file} has model_type {model_type!r}, not {expected!r}: {flag} takes a {expected} folder.")
    model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    missing = sorted(key for key in info["missing_keys"] if not key.startswith(tuple(optional)))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} {tensors} tensors ({', '.join(missing[:4])}): {instead}")
    return model


def load_image_processor(image_processor_name: str | None, model_folder: str | Path):
    """The image processor of `--image_processor_name` when given, else of the (already checked) model folder."""
    if image_processor_name:
        model_folder = local_folder(image_processor_name, "--image_processor_name")
    return AutoImageProcessor.from_pretrained(model_folder)


CHECKPOINT_COMPLETE = "checkpoint_complete"  # written into checkpoint-N once every process has saved its part


def checkpoint_folder(output_dir: str, step: int) -> Path:
    """Where the Trainer writes the checkpoint of `step`."""
    return Path(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("-")[-1])


def checkpoint_folders(output_dir: str) -> list[Path]:
    """Every `checkpoint-N` folder of `output_dir`, complete or not, the newest (largest N) first."""
    folders = [path for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.is_dir()]
    return sorted((path for path in folders if path.name.split("-")[-1].isdigit()), key=checkpoint_step, reverse=True)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` folder that was completely written; half-written ones are skipped loudly."""
    for folder in checkpoint_folders(output_dir):
        if (folder / CHECKPOINT_COMPLETE).is_file():
            return str(folder)
        logger.warning(
            "Skipping %s: it has no %s marker, so its writing was interrupted (a killed run?); it is not loaded.",
            folder,
            CHECKPOINT_COMPLETE,
        )
    return None
