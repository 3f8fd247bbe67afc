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

# The one place the tests pin torch to one thread (nothing they run changes it): the test models are tiny, and a
# second thread costs more in synchronisation than it gains, many times over on a busy machine.
torch.set_num_threads(1)

# A small released-format classifier with its inputs and expected outputs (see tests/fixtures/README.md).
REFERENCE_FIXTURE = REPO / "tests" / "fixtures" / "reference_cls_bidir"


@pytest.fixture(scope="session")
def reference_fixture_dir() -> Path:
    return REFERENCE_FIXTURE
