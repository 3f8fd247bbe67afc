"""Saved folders: loading them, the one way every entry point does it (`local_folder` -> `load_config`, a folder's
config with the run's changes -> `load_model`, its weights, complete), finding the newest complete checkpoint, and
saying what a failed checkpoint write leaves.

Models, configs and image processors load from local folders only, never from the Hugging Face Hub: a Hub id
(the release's `SixAILab/nepa-*`) fails at once with the `hf download` command that makes it a local folder, so a
run never waits on, or silently depends on, the network. Weights must cover the whole model: a tensor the model
needs and the folder lacks is an error that says what to do instead, never a random initialisation.
"""

import json
import logging
import shutil
from pathlib import Path

import torch.distributed as dist

from transformers import AutoImageProcessor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from models.vit_nepa import ViTNepaConfig

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


def parse_config_overrides(text: str | None) -> dict:
    """`'a=1,b=false,c=null'` -> `{"a": 1, "b": False, "c": None}`; a value that is not JSON stays a string."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config_overrides item {item!r} is not key=value.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def load_config(path: str | Path, flag: str, config_overrides: str | None, revision: str | None = None, **spelled) -> ViTNepaConfig:
    """The `ViTNepaConfig` of the local folder `path` (passed as `flag`; `revision`: the Hub revision a user names)
    with `--config_overrides` applied, and then the fields that an entry point's own flags spell out
    (`drop_path_prob=args.drop_path`; `None` = not given, the config's value stays)."""
    config = ViTNepaConfig.from_pretrained(local_folder(path, flag, revision))
    overrides = parse_config_overrides(config_overrides)
    for key, value in spelled.items():
        if value is None:
            continue
        if key in overrides and overrides[key] != value:
            raise ValueError(f"--config_overrides sets {key}={overrides[key]} and a flag sets it to {value}: pass one.")
        overrides[key] = value
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"--config_overrides: ViTNepaConfig has no field {key!r}.")
        setattr(config, key, value)
    config.check_geometry()
    return config


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


def complete_checkpoints(output_dir: str) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir` that carry the completion marker, the newest first."""
    return [folder for folder in checkpoint_folders(output_dir) if (folder / CHECKPOINT_COMPLETE).is_file()]


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


def chosen_by_process_zero(choose):
    """`choose()` as process 0 answers it, in every process (its error too). Each process reading its own listing of
    a shared folder may see another one (a network file system's cached listing after a quick requeue), and
    processes that resume from different checkpoints train on different states."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return choose()
    answer = [None]
    if dist.get_rank() == 0:
        try:
            answer[0] = choose()
        except Exception as error:  # raised in every process, below
            answer[0] = error
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], Exception):
        raise answer[0]
    return answer[0]


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message says where, why, and what a rerun resumes from."""


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def size_text(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def space_against_previous(output_dir: str) -> tuple[int, Path | None, int]:
    """The free bytes on `output_dir`'s filesystem, and the newest complete checkpoint there and its size (None, 0
    without one)."""
    free = shutil.disk_usage(output_dir).free
    previous = next(iter(complete_checkpoints(output_dir)), None)
    return free, previous, folder_size(previous) if previous else 0


def warn_when_short_of_space(output_dir: str) -> None:
    """Before a checkpoint is written: a warning when less space is free than the previous checkpoint took."""
    free, previous, size = space_against_previous(output_dir)
    if previous is not None and free < size:
        logger.warning(
            "%s free on the filesystem of %s, less than the %s that the previous checkpoint (%s) takes: the next "
            "checkpoint's write will likely fail. Free some space there.", size_text(free), output_dir, size_text(size), previous
        )


def write_failure_message(folder: Path, failures: dict[int, str]) -> str:
    """What to tell the user once `folder` (a checkpoint-N being written) failed in the processes of `failures`
    (process index: the error) and was removed: the folder, the causes, free space against the previous
    checkpoint's size, and the checkpoint a rerun resumes from."""
    output_dir = str(folder.parent)
    free, previous, size = space_against_previous(output_dir)
    causes = "; ".join(f"process {rank}: {error}" for rank, error in sorted(failures.items()))
    space = f"{size_text(free)} free on its filesystem"
    space += f", against {size_text(size)} for the previous checkpoint" if previous else " (no previous checkpoint to compare with)"
    resume = f"A rerun resumes from {previous}" if previous else "No complete checkpoint is left: a rerun starts from step 0"
    return (
        f"Could not write the checkpoint {folder} ({causes}); {space}. Every process stopped, and the incomplete "
        f"{folder.name} was removed (it was never marked complete). {resume}: free space there (or move the output "
        f"folder to a larger disk) and run the same command again."
    )
