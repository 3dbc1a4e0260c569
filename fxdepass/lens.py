"""The layer lens: each component's share of the target as it stands in the residual stream after every layer.

Row ℓ reads the components of the residual stream after layer ℓ (row 0: entering the first block) through the
model's own tail — the final norm with its *real* scale frozen, the head, the target's frozen coefficients —
exactly as the final residual stream is read.  So the last row *is* the attribution of the target: its
entries equal the contributions ``attribution.scores()`` (test: tests/test_lens.py), and every row shares
the same units.  Earlier rows answer "what would the target be if the stream stopped here", in those units.

How: a second decomposed pass whose seed sits at the last block's output and splits it into the given
components — every layer's components stacked, plus one that balances them to the real value — so the tail
applies its frozen linear map to each of them (Note [Lens by a seed]).

>>> lens = fxdepass.layer_lens(decomposed, "The capital of France is")                     # doctest: +SKIP
>>> lens.scores[-1, :, 0, -1]          # equals decomposed.attribute(...).scores()        # doctest: +SKIP
>>> fxdepass.plot_layers(decomposed, "The capital of France is").savefig("layers.png")   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any

import torch

from .api import Attribution, DecomposedModel
from .errors import InvalidInputError, InvalidReadoutError
from .plots import _axes
from .seeds import Seed, custom

if TYPE_CHECKING:
    import matplotlib.axes
    import matplotlib.figure

__all__ = ["LayerLens", "layer_lens", "plot_layers"]

# Note [Lens by a seed]
# The tail from the last block's output to the target is linear in the components once the norm's scale is
# frozen (SPEC §2), so applying it to any vector of the residual's shape gives that vector's share of the
# target. A custom seed at the last block's output whose split returns those vectors (and the remainder
# that makes them sum to the real value) runs exactly that map through the rules, for any norm and head.
# The split reads the vectors from an object kept per DecomposedModel, so the seed — and the compiled
# module cached for it — stays the same from one call to the next.


class _GivenParts:
    """A split returning components set beforehand, then the remainder that makes them sum to the value."""

    def __init__(self) -> None:
        self.parts: torch.Tensor | None = None
        self.lock = threading.Lock()

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        parts = self.parts.to(value.dtype)
        if parts.shape[-2] != value.shape[-2]:  # a last-position pass computes the tail at the last position only
            parts = parts[..., -value.shape[-2]:, :]
        return torch.cat((parts, (value - parts.sum(0)).unsqueeze(0)))


@dataclasses.dataclass
class LayerLens:
    """``scores[ℓ, m, b, p]``: component ``m``'s share of prompt ``b``'s target at read position ``p`` as it
    stands after layer ``ℓ`` (row 0: entering the first block); ``scores[-1]`` equals the attribution's."""

    scores: torch.Tensor
    labels: list[str]
    layer_labels: list[str]
    attribution: Attribution

    def table(self, prompt: int = 0, position: int = -1) -> torch.Tensor:
        """``[layers + 1, components]`` for one prompt and read position."""
        return self.scores[:, :, prompt, position]


def layer_lens(decomposed: DecomposedModel, inputs: Any, *, seed: Seed | None = None, targets: Any = None,
               positions: Any = None, attention_mask: Any = None) -> LayerLens:
    """The layer lens of ``seed``'s components (default: tokens) for ``targets`` at ``positions`` (module docstring).

    >>> lens = layer_lens(decomposed, ids, targets=" Paris")                                # doctest: +SKIP
    >>> lens.table()[-1]                   # each token's contribution to the logit of ' Paris'
    """
    passes = decomposed.attribute(inputs, seed=seed, readout=["logits", "layers"], targets=targets,
                                  positions=positions, attention_mask=attention_mask)
    logits, layers = passes["logits"], passes["layers"]
    if logits.targets is None:
        raise InvalidReadoutError("layer_lens() explains one target per prompt, not targets='all'")
    ids = logits.input_ids
    where = decomposed.locations_for(decomposed.prompt_inputs(ids, attention_mask))
    given = decomposed.__dict__.setdefault("_lens_parts", _GivenParts())
    rows, components = layers.components.shape[:2]                              # [L+1, M+1, B, N, D]
    with given.lock:
        given.parts = layers.components.flatten(0, 1)
        try:
            lens = decomposed.attribute(ids, seed=custom(where.blocks[-1], "output", given), targets=logits.targets,
                                        positions=logits.positions, attention_mask=attention_mask)
        finally:
            given.parts = None
    shares = lens.components[: rows * components, ..., 0].unflatten(0, (rows, components))
    # the head's bias and the targets' frozen constants are rest's, in every row as in the attribution
    shares[:, -1] += lens.components[-1, ..., 0]
    labels = ["embeddings"] + [f"after layer {layer}" for layer in range(rows - 1)]
    return LayerLens(shares, logits.labels, labels, logits)


def plot_layers(decomposed: DecomposedModel, inputs: Any, *, targets: Any = None, seed: Seed | None = None,
                ax: matplotlib.axes.Axes | None = None) -> matplotlib.figure.Figure:
    """The tokens × layers heatmap of one prompt at its last position: each component's share of the target
    as it stands in the residual stream after each layer (:func:`fxdepass.layer_lens`: read through the final
    norm with its real scale frozen and the target's row of the head, so the top row is the attribution's scores).

    >>> fxdepass.plot_layers(decomposed, "The capital of France is", targets=" Paris").savefig("layers.png")  # doctest: +SKIP
    """
    lens = layer_lens(decomposed, inputs, targets=targets, seed=seed)
    if lens.attribution.input_ids.shape[0] != 1:
        raise InvalidInputError("plot_layers() draws one prompt; give one text or one row of ids")
    table = lens.table(0, -1).detach().cpu().double().flip(0)                  # [layers + 1, components], last on top
    figure, ax = _axes(ax, max(5.0, 0.45 * table.shape[1] + 2.5), max(3.0, 0.28 * table.shape[0] + 1.5))
    largest = float(table.abs().max()) or 1.0
    image = ax.imshow(table.numpy(), cmap="RdBu", vmin=-largest, vmax=largest, aspect="auto")
    figure.colorbar(image, ax=ax, label="share of the target")
    ax.set_xticks(range(len(lens.labels)), lens.labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(lens.layer_labels)), lens.layer_labels[::-1], fontsize=7)
    ax.set_title(f"target {lens.attribution.target_label(0)}: each component after each layer", fontsize=10)
    return figure
