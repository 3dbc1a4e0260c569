"""The layer lens (fxdepass/lens.py): its last row is the attribution itself, exactly, in every family."""
from __future__ import annotations

import pytest
import torch

import families
import fxdepass
import tiny


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi", "mixtral"])
def test_the_last_row_of_the_lens_is_the_attribution(family: str) -> None:
    decomposed = fxdepass.compile(families.build(family, layers=2, seed=3), dtype=torch.float64)
    ids = torch.randint(0, families.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    targets = [4, fxdepass.diff(3, 5)]
    lens = fxdepass.layer_lens(decomposed, ids, targets=targets)
    attribution = decomposed.attribute(ids, targets=targets)
    assert lens.scores.shape == (3, 10, 2, 1) and lens.layer_labels == ["embeddings", "after layer 0", "after layer 1"]
    scale = attribution.scores().abs().max()
    assert float((lens.scores[-1, :, :, -1] - attribution.scores()).abs().max() / scale) <= 1e-12
    # each row is the target read from that layer's stream: row 0 holds each token's embedding alone
    assert torch.count_nonzero(lens.scores[0, :-1]) > 0


def test_lens_rows_are_what_the_tail_makes_of_each_layer() -> None:
    """Row ℓ, summed, is the target computed from the real residual stream after layer ℓ through the final norm
    with the last layer's frozen scale: checked by hand on the tiny Llama's RMSNorm."""
    model, decomposed = tiny.compiled()
    lens = fxdepass.layer_lens(decomposed, tiny.IDS, targets=7)
    hidden = []
    handles = [layer.register_forward_hook(lambda m, a, out: hidden.append(out[0] if isinstance(out, tuple) else out))
               for layer in model.model.layers]
    with torch.no_grad():
        model(tiny.IDS)
    for handle in handles:
        handle.remove()
    norm = model.model.norm
    last = hidden[-1][0, -1]
    scale = torch.rsqrt(last.pow(2).mean() + norm.variance_epsilon)          # the frozen scale of the real run
    for row, stream in zip(lens.table()[1:], hidden):
        expected = (norm.weight * stream[0, -1] * scale) @ model.lm_head.weight[7]
        # the eager model's norms compute in float32 (SPEC §5), fxdepass's float64 pass does not: 1e-6, not 1e-12
        assert abs(float(row.sum()) - float(expected)) <= 1e-6 * abs(float(expected))


def test_the_lens_needs_one_target() -> None:
    _, decomposed = tiny.compiled()
    with pytest.raises(fxdepass.InvalidReadoutError, match="one target per prompt"):
        fxdepass.layer_lens(decomposed, tiny.IDS, targets="all")
