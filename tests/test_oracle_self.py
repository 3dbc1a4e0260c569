"""Self-checks of the Llama DePass test oracle (tests/oracle_llama.py).

(a) components sum to the oracle's own real logits; (b) the oracle's real forward matches the
Hugging Face model; (c) the sink option changes the result; (d) if the paper-reference fixtures are
present, the oracle reproduces the paper's own token-level outputs.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from oracle_llama import depass_tokens_llama  # noqa: E402

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "paper-reference"
FIXTURE_FILES = ["llama_init0.02_fp64_exact64.pt", "llama_init0.2_fp64_exact64.pt"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def _tiny_llama(seed: int, **extra):
    """A float64 two-layer Llama with norm weights near one (and ``extra`` config fields)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    model = transformers.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tiny_model():
    model = _tiny_llama(0)
    input_ids = torch.randint(0, 64, (1, 10))
    return model, input_ids


@pytest.fixture(scope="module")
def tiny_results(tiny_model):
    model, input_ids = tiny_model
    return {sink: depass_tokens_llama(model, input_ids, sink=sink) for sink in (True, False)}


@pytest.mark.parametrize("sink", [True, False])
def test_components_sum_to_real(tiny_results, sink):
    out = tiny_results[sink]
    N = out["logits"].shape[0]
    assert out["logits_components"].shape[:2] == (N + 1, N)
    assert _rel(out["logits_components"].sum(0), out["logits"]) < 1e-10
    assert _rel(out["layers"].sum(1), out["layers_real"]) < 1e-10
    assert abs(float(out["scores"].sum()) - float(out["logits"][-1, out["target"]])) < 1e-10 * float(
        out["logits"].abs().max()
    )
    # bias-free model: rest stays exactly zero
    assert float(out["layers"][:, N].abs().max()) == 0.0


def test_real_logits_match_hf(tiny_model, tiny_results):
    model, input_ids = tiny_model
    with torch.no_grad():
        hf = model(input_ids, use_cache=False).logits[0].double()
    for sink in (True, False):
        assert _rel(tiny_results[sink]["logits"], hf) < 1e-6


def test_sink_changes_result(tiny_results):
    a = tiny_results[True]["logits_components"]
    b = tiny_results[False]["logits_components"]
    assert not torch.allclose(a, b, rtol=0, atol=1e-12)
    # the real logits do not depend on the option
    assert torch.equal(tiny_results[True]["logits"], tiny_results[False]["logits"])


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"paper-reference fixtures not found at {FIXTURES}")
@pytest.mark.parametrize("fname", FIXTURE_FILES)
@pytest.mark.parametrize("sink", [True, False])
def test_matches_paper_reference(fname, sink):
    path = FIXTURES / fname
    if not path.is_file():
        pytest.skip(f"{path} missing")
    data = torch.load(path, weights_only=True)
    config = transformers.LlamaConfig(**data["config"])
    model = transformers.LlamaForCausalLM(config).double().eval()
    model.load_state_dict(data["state_dict"])
    input_ids = data["input_ids"]
    ref = data["results"][f"ignore_special_token={sink}"]

    out = depass_tokens_llama(model, input_ids, sink=sink)
    N = input_ids.numel()

    assert out["target"] == int(ref["target_token_id"])
    score_err = _rel(out["scores"][:N], ref["score_fp64_convenience"].double())
    # fixture all_layer: [layer, position, source, D]; ours: [layer, component, position, D]
    ours_layers = out["layers"][:, :N].permute(0, 2, 1, 3)
    layer_err = _rel(ours_layers, ref["all_layer"].double())
    print(f"{fname} sink={sink}: score rel err {score_err:.3e}, all_layer rel err {layer_err:.3e}")
    assert score_err < 1e-6
    assert layer_err < 1e-6


def test_biases_go_to_rest_and_sum_exact():
    model = _tiny_llama(1, attention_bias=True, mlp_bias=True)
    input_ids = torch.randint(0, 64, (10,))
    out = depass_tokens_llama(model, input_ids, sink=True)
    N = input_ids.numel()
    assert _rel(out["logits_components"].sum(0), out["logits"]) < 1e-10
    assert float(out["layers"][-1, N].abs().max()) > 0.0  # rest carries the biases
    with torch.no_grad():
        hf = model(input_ids[None], use_cache=False).logits[0].double()
    assert _rel(out["logits"], hf) < 1e-6
