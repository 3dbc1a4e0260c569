"""The coverage check of tools/coverage.py on a fixed list of families: each must be exact in float64.

The families run two at a time in forked processes (``coverage.run``), once for the module; each
family is then its own test, failing with the report's reason.
"""
from __future__ import annotations

import pytest

from conftest import load_tool

coverage = load_tool("coverage")

#: The families of the architecture-breadth issue, plus a few more of each kind (those tests/test_families.py
#: runs with every seed kind — llama, mistral, qwen3, mixtral, qwen2_moe, bert, … — are not repeated here).
FAMILIES = (
    # Dense decoders: rotary, ALiBi and learned positions, sliding windows, soft-capping, parallel blocks.
    "gemma2", "gemma3_text", "bloom", "falcon", "gptj", "phi3", "stablelm",
    "starcoder2", "cohere", "granite", "olmo", "olmo2", "smollm3", "gpt_bigcode", "gpt_neo",
    # Mixtures of experts: softmax and sigmoid routers, group top-k, shared experts, latent attention; one added
    # in transformers 5.25 (MiniCPM5's).
    "qwen3_moe", "olmoe", "deepseek_v3", "minicpm5_moe",
    # Hybrid linear attention whose fused projection is viewed into heads before the split (not narrowable).
    "qwen3_next",
    # Outputs nested in tuples (XLNet's mems beside its logits).
    "xlnet",
    # Standalone decoders of encoder-decoder families (depth named decoder_layers), looped blocks (HRM's
    # two stacks in cycles, ALBERT's one shared layer group), positions the model adds (CpmAnt's prompt).
    "bart", "marian", "hrm_text", "cpmant",
    # A decoder of transformers 5.25 whose layers run in a loop.
    "inkling2_loop_text",
    # Bidirectional encoders.
    "distilbert", "electra", "albert",
)



@pytest.fixture(scope="module")
def results() -> dict[str, object]:
    todo = [f for f in coverage.families() if f.model_type in FAMILIES]
    assert {f.model_type for f in todo} == set(FAMILIES), "a family is missing from the installed transformers"
    return {r.family.model_type: r for r in coverage.run(todo, jobs=2, timeout=300.0)}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_exact(family: str, results: dict[str, object]) -> None:
    result = results[family]
    assert result.status == "exact", result.status
    assert result.error <= coverage.EXACT
    assert result.rest <= coverage.DEGENERATE  # "exact" already says so; the report's column must have it
