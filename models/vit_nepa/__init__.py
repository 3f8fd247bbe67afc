"""ViT-NEPA. Importing this package registers `vit_nepa` with the Transformers Auto classes."""

from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_vit_nepa import ViTNepaConfig
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
AutoModelForImageClassification.register(ViTNepaConfig, ViTNepaForImageClassification, exist_ok=True)
AutoBackbone.register(ViTNepaConfig, ViTNepaBackbone, exist_ok=True)

__all__ = [
    "ViTNepaBackbone",
    "ViTNepaConfig",
    "ViTNepaModel",
    "ViTNepaForPreTraining",
    "ViTNepaForImageClassification",
    "ViTNepaPreTrainedModel",
    "nepa_loss",
]
