import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from models.vit_nepa import ViTNepaConfig  # noqa: E402

# The test models are tiny: a second thread costs more in synchronisation than it gains, many times
# over on a busy machine.
torch.set_num_threads(1)

# A small released-format classifier with its inputs and expected outputs (see tests/fixtures/README.md).
REFERENCE_FIXTURE = REPO / "tests" / "fixtures" / "reference_cls_bidir"


@pytest.fixture(scope="session")
def reference_fixture_dir() -> Path:
    return REFERENCE_FIXTURE


def tiny_config(**overrides) -> ViTNepaConfig:
    """A ViT-NEPA small enough for a unit test: 4x4 patches of 8 px, 2 layers, head_dim 8."""
    values = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        qk_norm=True,
        qk_norm_affine=True,
    )
    values.update(overrides)
    return ViTNepaConfig(**values)
