"""ViT-NEPA. Importing this package registers `vit_nepa` with the Transformers Auto classes, and makes every
folder `save_pretrained` writes self-contained: it carries `configuration_vit_nepa.py`, `modeling_vit_nepa.py`
and an `auto_map`, so that plain `transformers` loads it with `trust_remote_code=True`."""

import json
import shutil
from pathlib import Path

from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from .configuration_vit_nepa import AUTO_MAP, ViTNepaConfig
from .modeling_vit_nepa import (
    ViTNepaBackbone,
    ViTNepaForImageClassification,
    ViTNepaForPreTraining,
    ViTNepaModel,
    ViTNepaPreTrainedModel,
    nepa_loss,
)

AutoConfig.register("vit_nepa", ViTNepaConfig, exist_ok=True)
AutoModel.register(ViTNepaConfig, ViTNepaModel, exist_ok=True)
AutoModelForPreTraining.register(ViTNepaConfig, ViTNepaForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(ViTNepaConfig, ViTNepaForImageClassification, exist_ok=True)
AutoBackbone.register(ViTNepaConfig, ViTNepaBackbone, exist_ok=True)

# A class registered for an Auto class has its module file (and the files it imports relatively) copied by
# `save_pretrained` into the folder it writes.
ViTNepaConfig.register_for_auto_class("AutoConfig")
ViTNepaModel.register_for_auto_class("AutoModel")
ViTNepaForPreTraining.register_for_auto_class("AutoModelForPreTraining")
ViTNepaForImageClassification.register_for_auto_class("AutoModelForImageClassification")
ViTNepaBackbone.register_for_auto_class("AutoBackbone")

CODE_FILES = ("configuration_vit_nepa.py", "modeling_vit_nepa.py")


def save_model_code(folder: str | Path) -> None:
    """Copy the modelling code into `folder`, for folders that hold a NEPA encoder but are not written by a NEPA
    class's `save_pretrained` (a UperNet segmentation model)."""
    for name in CODE_FILES:
        shutil.copyfile(Path(__file__).parent / name, Path(folder) / name)


def make_self_contained(folder: str | Path) -> None:
    """Add the modelling code and the `auto_map` to a NEPA folder written elsewhere (a released `SixAILab/nepa-*`
    download); its config.json is otherwise kept as it is."""
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("model_type") != ViTNepaConfig.model_type:
        raise ValueError(f"{config_file} describes a {config.get('model_type')!r} model, not a vit_nepa one.")
    save_model_code(folder)
    config["auto_map"] = dict(AUTO_MAP)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = [
    "ViTNepaBackbone",
    "ViTNepaConfig",
    "ViTNepaModel",
    "ViTNepaForPreTraining",
    "ViTNepaForImageClassification",
    "ViTNepaPreTrainedModel",
    "make_self_contained",
    "nepa_loss",
    "save_model_code",
]
