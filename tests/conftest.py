"""Shared test set-up: the tests folder on sys.path, torch thread settings, the paper fixtures path."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", message=".*multiplies two decomposed values.*")

#: outputs of the paper's own code; present in CI beside the clone, absent in a user's clone
PAPER_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "paper-reference"


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value − reference| / max |reference|."""
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-300))


@pytest.fixture
def paper_reference() -> Path:
    if not PAPER_REFERENCE.is_dir():
        pytest.skip(f"paper-reference fixtures not found at {PAPER_REFERENCE} (they live in ../shared, beside the clone in CI)")
    return PAPER_REFERENCE
