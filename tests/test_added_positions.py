"""Token seeds of a model that prepends positions of its own (CpmAnt's prompt tokens; Note [Positions a
model adds] in fxdepass/seeds.py): one component per prompt token, the added positions in rest, exact in
float64 on a tiny random config."""
from __future__ import annotations

import pytest
import torch
import transformers

import fxdepass
from conftest import relative_error

VOCAB = 50
IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def cpmant() -> tuple[torch.nn.Module, fxdepass.DecomposedModel]:
    config = transformers.CpmAntConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, dim_head=8,
                                       dim_ff=48, num_hidden_layers=2, prompt_length=3, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.CpmAntForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model = model.eval().double()
    return model, fxdepass.compile(model, dtype=torch.float64)


def test_prompt_tokens_are_components_and_added_positions_rest(cpmant) -> None:
    model, decomposed = cpmant
    attribution = decomposed.attribute(IDS, positions="all", targets="all")
    assert attribution.components.shape[0] == IDS.shape[1] + 1  # the 3 prompt-token positions are not components
    assert attribution.labels[-1] == "rest"
    assert attribution.reconstruction_error() <= 1e-9
    with torch.no_grad():
        ordinary = model(input_ids=IDS, use_cache=False).logits
    assert relative_error(attribution.total, ordinary) <= 1e-5  # its norms cast to float32, which fxdepass removes
    # The added positions carry the learned prompt embeddings: rest holds them, so it is far from zero.
    assert attribution.components[-1].abs().max() > 1e-3 * attribution.total.abs().max()


def test_seed_splits_prompt_tokens_after_the_added_positions(cpmant) -> None:
    """At the residual stream entering the first block (readout ``"layers"``, entry 0), token ``j``'s
    component is the value at sequence index ``3 + j`` alone, and rest is the 3 added positions alone."""
    _, decomposed = cpmant
    entering = decomposed.attribute(IDS, readout="layers", positions="all").components[0]  # [7, 2, 9, hidden]
    assert entering.shape[:3] == (IDS.shape[1] + 1, 2, IDS.shape[1] + 3)
    nonzero = entering.abs().amax(dim=(1, 3)) > 0  # [component, position]
    expected = torch.zeros_like(nonzero)
    for j in range(IDS.shape[1]):
        expected[j, 3 + j] = True
    expected[-1, :3] = True
    assert torch.equal(nonzero, expected)


@pytest.mark.parametrize("position", [0, 2, -1])
def test_positions_count_from_the_prompts_first_token(cpmant, position: int) -> None:
    """``tokens(positions=[p])`` is the prompt's token ``p``, whatever the model prepends."""
    _, decomposed = cpmant
    one = decomposed.attribute(IDS, seed=fxdepass.tokens(positions=[position]), readout="layers", positions="all")
    assert one.reconstruction_error() <= 1e-9
    nonzero = one.components[0][0].abs().amax(dim=(0, 2)) > 0  # token p's component entering the first block
    assert nonzero.nonzero().flatten().tolist() == [3 + position % IDS.shape[1]]
