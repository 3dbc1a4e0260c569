"""Plots of attributions with matplotlib (an optional extra: ``pip install fxdepass[plot]``), imported when used.

>>> decomposed.attribute("The capital of France is").plot()        # one prompt: a bar per component  # doctest: +SKIP
>>> decomposed.attribute(["a b c", "d e"]).plot()                  # prompts × components heatmap     # doctest: +SKIP
>>> fxdepass.plot_layers(decomposed, "The capital of France is")   # tokens × layers (fxdepass.lens)  # doctest: +SKIP

Below :mod:`fxdepass.results` (whose ``Attribution.plot`` draws here): :func:`fxdepass.lens.plot_layers`, which
runs the model, lives with the layer lens.  Every function returns the matplotlib ``Figure`` (saved with ``figure.savefig(path)``); none calls ``show``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidInputError, InvalidReadoutError, require
from .seeds import is_padding

if TYPE_CHECKING:
    import matplotlib.axes
    import matplotlib.figure

    from .results import Attribution

__all__ = ["plot"]

#: cells of a heatmap are written in when there are at most this many columns (and prompts)
ANNOTATED = 24


def _pyplot() -> Any:
    return require("matplotlib.pyplot", "plot")


def _axes(ax: matplotlib.axes.Axes | None, width: float, height: float) -> tuple[matplotlib.figure.Figure, Any]:
    if ax is not None:
        return ax.figure, ax
    figure, ax = _pyplot().subplots(figsize=(width, height), layout="constrained")
    return figure, ax


def plot(attribution: Attribution, prompt: int | None = None, *, ax: matplotlib.axes.Axes | None = None
         ) -> matplotlib.figure.Figure:
    """Each component's contribution to the target at the last read position: a bar chart (rest last) for one
    prompt (``prompt``, or the only one), a heatmap of prompts × components for a batch (token components by
    position, padding blank, each cell's token written in when there is room).

    >>> figure = decomposed.attribute("The capital of France is").plot()                    # doctest: +SKIP
    >>> figure.savefig("paris.png")                                                         # doctest: +SKIP
    """
    if attribution.readout != "logits":
        raise InvalidReadoutError(f"plot() needs the 'logits' readout, not {attribution.readout!r}; "
                                  "fxdepass.plot_layers draws the layers")
    scores = attribution.scores()
    scores = (scores.unsqueeze(1) if scores.ndim == 1 else scores).detach().cpu().double()   # [C, prompts]
    count = scores.shape[1]
    if prompt is None and count == 1:
        prompt = 0
    if prompt is not None:
        if not -count <= prompt < count:
            raise InvalidInputError(f"prompt {prompt} is outside the batch of {count}")
        return _bars(attribution, scores[:, prompt % count], prompt % count, ax)
    return _heatmap(attribution, scores, ax)


def _bars(attribution: Attribution, values: torch.Tensor, prompt: int, ax: Any) -> matplotlib.figure.Figure:
    labels = attribution.labels_of(prompt)
    kept = [i for i, label in enumerate(labels) if not is_padding(label)]
    figure, ax = _axes(ax, max(4.0, 0.4 * len(kept) + 1.5), 3.5)
    heights = values[kept].tolist()
    ax.bar(range(len(kept)), heights, color=["#2166ac" if h >= 0 else "#b2182b" for h in heights])
    ax.set_xticks(range(len(kept)), [labels[i] for i in kept], rotation=60, ha="right", fontsize=8)
    ax.axhline(0.0, color="#444", linewidth=0.6)
    ax.set_ylabel("contribution")
    ax.set_title(f"target {attribution.target_label(prompt)} = {float(values.sum()):+.4g}", fontsize=10)
    return figure


def _heatmap(attribution: Attribution, scores: torch.Tensor, ax: Any) -> matplotlib.figure.Figure:
    count = scores.shape[1]
    table = scores.T.clone()                                                    # [prompts, C]
    labels = [attribution.labels_of(p) for p in range(count)]
    for p, row in enumerate(labels):
        for c, label in enumerate(row):
            if is_padding(label):
                table[p, c] = float("nan")
    figure, ax = _axes(ax, max(5.0, 0.45 * table.shape[1] + 2.5), max(2.5, 0.4 * count + 1.5))
    largest = float(table.nan_to_num().abs().max()) or 1.0
    image = ax.imshow(table.numpy(), cmap="RdBu", vmin=-largest, vmax=largest, aspect="auto")
    figure.colorbar(image, ax=ax, label="contribution")
    same = all(row == labels[0] for row in labels)
    columns = labels[0] if same else [label.split(" ", 2)[1] if label.startswith("tok ") else label for label in labels[0]]
    ax.set_xticks(range(len(columns)), columns, rotation=60 if same else 0, ha="right" if same else "center", fontsize=8)
    ax.set_xlabel("component" if same else "position (rest last)")
    prompts = attribution.metadata.get("prompts") or [None] * count
    ax.set_yticks(range(count), [_short(text) if text else f"prompt {p}" for p, text in enumerate(prompts)], fontsize=8)
    if not same and table.shape[1] <= ANNOTATED and count <= ANNOTATED:
        for p, row in enumerate(labels):
            for c, label in enumerate(row[:-1]):
                if not is_padding(label):
                    ax.text(c, p, label.split(" ", 2)[2].strip("'\""), ha="center", va="center", fontsize=6)
    ax.set_title("contributions to each prompt's target at its last position", fontsize=10)
    return figure


def _short(text: str, width: int = 32) -> str:
    return text if len(text) <= width else "…" + text[-width + 1:]
