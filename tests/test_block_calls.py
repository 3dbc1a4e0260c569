"""Blocks found from the captured graph (Note [Blocks are calls] in fxdepass/locations.py): a standalone
decoder whose config names its depth otherwise (BART: ``num_hidden_layers`` is the encoder's), and a
looped model whose blocks run several times (HRM), each exact in float64 on a tiny random config."""
from __future__ import annotations

import pytest
import torch
import transformers

import fxdepass
from conftest import relative_error

VOCAB = 50


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """1-d parameters (norm weights, biases) moved off their initial values, so that they matter."""
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval().double()


def _bart_decoder() -> torch.nn.Module:
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=3, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=64)
    torch.manual_seed(0)
    return _perturbed(transformers.BartForCausalLM(config))


def _hrm() -> torch.nn.Module:
    config = transformers.HrmTextConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=48, H_cycles=2, L_cycles=3, max_position_embeddings=64)
    torch.manual_seed(0)
    return _perturbed(transformers.HrmTextForCausalLM(config))


IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _assert_exact(decomposed: fxdepass.DecomposedModel, model: torch.nn.Module, seed: object) -> torch.Tensor:
    attribution = decomposed.attribute(IDS, seed=seed, positions="all", targets="all")
    assert attribution.reconstruction_error() <= 1e-9
    with torch.no_grad():
        ordinary = model(input_ids=IDS, use_cache=False).logits
    assert relative_error(attribution.total, ordinary) <= 1e-5  # HRM's norm casts to float32, which fxdepass removes
    return attribution.components


@pytest.fixture(scope="module")
def bart() -> tuple[torch.nn.Module, fxdepass.DecomposedModel]:
    model = _bart_decoder()
    return model, fxdepass.compile(model, dtype=torch.float64)


@pytest.fixture(scope="module")
def hrm() -> tuple[torch.nn.Module, fxdepass.DecomposedModel]:
    model = _hrm()
    return model, fxdepass.compile(model, dtype=torch.float64)


def test_bart_decoder_layers_are_its_decoder_layers(bart) -> None:
    model, decomposed = bart
    assert model.config.num_hidden_layers == 3  # the encoder's depth: a wrong hint would give no blocks
    assert decomposed.layers == 2
    where = decomposed.locations_of(next(iter(decomposed._captures.values())))
    assert where.blocks == ["model.decoder.layers.0", "model.decoder.layers.1"]


@pytest.mark.parametrize("seed", [fxdepass.tokens(), fxdepass.heads(1), fxdepass.neurons(0), fxdepass.modules(1)],
                         ids=["tokens", "heads1", "neurons0", "modules1"])
def test_bart_decoder_is_exact(bart, seed) -> None:
    _assert_exact(bart[1], bart[0], seed)


def test_hrm_layers_are_block_calls_in_execution_order(hrm) -> None:
    model, decomposed = hrm
    where = decomposed.locations_of(next(iter(decomposed._captures.values())))
    # HRM's own count of block runs (its cache slots): per-stack layers · H_cycles · (L_cycles + 1)
    assert decomposed.layers == model.config.num_hidden_layers == 2 * 2 * (3 + 1)
    low = [f"model.L_module.layers.{i}{suffix}" for suffix in ("", "@1", "@2") for i in (0, 1)]
    assert where.blocks[:8] == low + ["model.H_module.layers.0", "model.H_module.layers.1"]
    assert where.blocks[8:10] == ["model.L_module.layers.0@3", "model.L_module.layers.1@3"]
    assert where.blocks[-2:] == ["model.H_module.layers.0@1", "model.H_module.layers.1@1"]


@pytest.mark.parametrize("seed", [fxdepass.tokens(), fxdepass.heads(8), fxdepass.neurons(15), fxdepass.modules(3)],
                         ids=["tokens", "heads8", "neurons15", "modules3"])
def test_hrm_is_exact(hrm, seed) -> None:
    _assert_exact(hrm[1], hrm[0], seed)


def test_hrm_calls_of_one_block_are_distinct_layers(hrm) -> None:
    """Layers 0 and 8 are the same module (``model.L_module.layers.0``) run in different cycles: their
    heads see different inputs, so their attributions differ."""
    model, decomposed = hrm
    first = _assert_exact(decomposed, model, fxdepass.heads(0))
    later = _assert_exact(decomposed, model, fxdepass.heads(8))
    assert relative_error(first[:-1], later[:-1]) > 1e-3
