"""Attributions as data: :class:`Attribution` (what :meth:`fxdepass.api.DecomposedModel.attribute` returns), a short
summary, the notebook view, a long-format table, and saving and loading.

:class:`Attribution` delegates to these functions (``repr``, ``_repr_html_``, ``to_dataframe``, ``save``; ``plot``
to :mod:`fxdepass.plots`); :func:`load_attribution` reads a saved attribution back.  Nothing here imports the
compiler (:mod:`fxdepass.api` builds on this module), so a saved attribution loads without it.

>>> attribution.save("paris.safetensors")                                              # doctest: +SKIP
>>> fxdepass.load_attribution("paris.safetensors").top(3)                              # doctest: +SKIP
[("tok 4 ' France'", 3.02), ...]

Saved attributions are one safetensors file: the tensors, and in its header (``__metadata__``) one JSON
document with everything else (labels, readout, positions, where it came from: model, prompts, seed,
targets, fxdepass version).  Nothing is pickled, so loading runs no code.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checks import integer, relative_error
from .errors import InvalidInputError, InvalidReadoutError, require
from .markup import _STYLE, _chip, _e
from .plots import plot
from .seeds import is_padding
from .targets import Target, per_prompt

if TYPE_CHECKING:
    import os
    import pathlib

    import matplotlib.figure
    import pandas

__all__ = ["Attribution", "summary", "notebook_html", "to_dataframe", "save", "load_attribution", "target_to_json", "target_from_json",
           "json_number", "FORMAT"]

#: the name under which the JSON document sits in the safetensors header, and its format version
FORMAT = "fxdepass.attribution"
VERSION = 1
#: prompts the notebook view shows before saying how many more there are
SHOWN_PROMPTS = 8


@dataclasses.dataclass
class Attribution:
    """Components of a readout: ``components.sum(0)`` equals ``total``.

    ``components`` has the component axis first (one per source, ``rest`` last) followed by the readout's own
    shape.  For the logits readout that is ``[batch, positions, 1]``: each prompt's target (``targets``, by
    default the predicted token) at each read position (``positions``, by default the last); with
    ``targets="all"`` the last axis is the whole vocabulary.  ``labels`` names each component.

    >>> attribution.scores()             # each component's contribution to the target at the last position
    >>> attribution.reconstruction_error()   # max |Σ components − total| / max |total|
    """

    components: torch.Tensor
    total: torch.Tensor
    labels: list[str]
    input_ids: torch.Tensor
    readout: str
    #: the logits readout's target of each prompt (:mod:`fxdepass.targets`); ``None``: the whole vocabulary
    targets: list[Target] | None = None
    #: axis of ``components`` that indexes components (1 for the ``"layers"`` readout, else 0)
    component_axis: int = 0
    #: the positions read out (``None``: all of them)
    positions: list[int] | None = None
    #: the peak bytes (weights excluded) the memory guard estimated for the pass, before running it
    memory_estimate: int | None = None
    #: one readable name per prompt of its target (``"' Paris'"``, ``"log p(' Paris')"``, …)
    target_labels: list[str] | None = None
    #: turns target specs (token strings, diff, logprob) into checked targets, for ``scores(target)``
    resolve_target: Any = dataclasses.field(default=None, repr=False, compare=False)
    #: 0 at padding positions of the prompts, 1 at their tokens (``None``: no padding)
    attention_mask: torch.Tensor | None = None
    #: each prompt's own labels, when they differ by prompt (token components of a batch); see :meth:`labels_of`
    prompt_labels: list[list[str]] | None = None
    #: where the attribution comes from (model, prompts, seed, dtype, fxdepass version); saved with it
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _position(self, position: int) -> int:
        length = self.input_ids.shape[1]
        if isinstance(position, bool) or not isinstance(position, int):
            raise InvalidInputError(f"position must be an integer, got {position!r}")
        if not -length <= position < length:
            raise InvalidInputError(f"position {position} is outside a prompt of {length} tokens")
        position %= length
        if self.positions is None:
            return position
        if position not in self.positions:
            raise InvalidInputError(f"position {position} was not read out (read: {self.positions}); "
                                    "attribute(..., positions=[...]) or positions='all'")
        return self.positions.index(position)

    def scores(self, target: Any = None, position: int = -1) -> torch.Tensor:
        """Each component's contribution to the target at ``position``: ``[components]`` for one prompt,
        ``[components, batch]`` for several.

        ``target`` defaults to the target the attribution was computed for; another (a token id or string,
        ``fxdepass.diff``, ``fxdepass.logprob``, one per prompt as a list) needs ``targets="all"``, which
        computed every logit, or must equal the computed one.

        >>> attribution.scores()                       # the target given to attribute(), or the predicted token
        >>> everything.scores(fxdepass.diff(" Paris", " Berlin"))                           # doctest: +SKIP
        """
        if self.readout != "logits":
            raise InvalidReadoutError(f"scores() needs the 'logits' readout, not {self.readout!r}")
        column = self._position(position)
        batch = self.total.shape[0]
        at_position = self.components[:, :, column]                             # [components, batch, K]
        if target is None and self.targets is not None:
            picked = at_position[..., 0]
        else:
            wanted = targets_per_prompt(target, batch, self.resolve_target)
            if self.targets is not None:
                if wanted != self.targets:
                    raise InvalidInputError(f"target {target!r} was not read out (the attribution's targets: "
                                            f"{self.target_labels}); attribute(..., targets=...) it, or targets='all'")
                picked = at_position[..., 0]
            else:  # every logit was computed: the target's functional, exactly (fxdepass/targets.py)
                real = self.total[:, column]                                    # [batch, vocabulary]
                picked = torch.stack([(at_position[:, b] * t.coefficients(real[b:b + 1])).sum(-1)
                                      for b, t in enumerate(wanted)], 1)
                picked[-1] += torch.stack([t.constant(real[b:b + 1])[0] for b, t in enumerate(wanted)])
        return picked[:, 0] if batch == 1 else picked

    @property
    def target_values(self) -> torch.Tensor:
        """The real value of each prompt's target at each read position, ``[batch, positions]``."""
        if self.readout != "logits" or self.targets is None:
            raise InvalidReadoutError("target_values needs the logits readout with a target (not targets='all')")
        return self.total[..., 0]

    def labels_of(self, prompt: int) -> list[str]:
        """Prompt ``prompt``'s labels: its own tokens for token components (padding reads ``"tok 0 <pad>"``).
        ``labels`` are prompt 0's.

        >>> decomposed.attribute(["a b c", "d"]).labels_of(1)                   # doctest: +SKIP
        ['tok 0 <pad>', 'tok 1 <pad>', "tok 2 'd'", 'rest']
        """
        count = self.input_ids.shape[0]
        prompt = integer(prompt, "prompt")
        if not -count <= prompt < count:
            raise InvalidInputError(f"prompt {prompt} is outside the batch of {count}")
        return self.labels if self.prompt_labels is None else self.prompt_labels[prompt]

    def target_label(self, prompt: int) -> str:
        """Prompt ``prompt``'s target as a readable name (``"' Paris'"``); ``"every logit"`` for ``targets="all"``.

        >>> decomposed.attribute("The capital of France is").target_label(0)          # doctest: +SKIP
        "' Paris'"
        """
        if self.target_labels:
            return self.target_labels[prompt]
        return "every logit" if self.readout == "logits" else "none"

    def __repr__(self) -> str:
        return summary(self)

    def _repr_html_(self) -> str:
        return notebook_html(self)

    def to_dataframe(self) -> pandas.DataFrame:
        """The scores as a long table (prompt, component, label, target, position, score); see
        :func:`to_dataframe`.

        >>> decomposed.attribute(["The capital of France is"]).to_dataframe().head()       # doctest: +SKIP
        """
        return to_dataframe(self)

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write this attribution to a safetensors file (no pickle); read it with :func:`fxdepass.load_attribution`.

        >>> decomposed.attribute("The capital of France is").save("paris.safetensors")       # doctest: +SKIP
        """
        return save(self, path)

    def plot(self, prompt: int | None = None, **kwargs: Any) -> matplotlib.figure.Figure:
        """A bar chart of one prompt's scores, or a prompts × components heatmap of a batch; see
        :func:`fxdepass.plots.plot`.

        >>> decomposed.attribute("The capital of France is").plot().savefig("paris.png")     # doctest: +SKIP
        """
        return plot(self, prompt, **kwargs)

    def reconstruction_error(self) -> float:
        """Max relative error of the sum of components against the real value (same precision policy)."""
        return relative_error(self.total, self.components, self.component_axis)

    def top(self, k: int = 10, target: Any = None, position: int = -1) -> list[tuple[str, float]]:
        """The ``k`` components with the largest absolute ``scores`` (first prompt), with their labels."""
        k = integer(k, "top(k)")
        values = self.scores(target, position)
        values = values if values.ndim == 1 else values[:, 0]
        order = values.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(values[i])) for i in order.tolist()]


def targets_per_prompt(spec: Any, batch: int, resolve: Any) -> list[Target]:
    """The resolved target of each prompt for ``spec`` (:func:`fxdepass.targets.per_prompt`); ``resolve(spec, batch)``
    knows the model's tokenizer and vocabulary (without it, only token ids resolve)."""
    return resolve(spec, batch) if resolve is not None else per_prompt(spec, batch, None, None)


def summary(attribution: Attribution) -> str:
    """Two lines saying what an attribution holds: its readout and shape, its components and target, and the
    reconstruction error (``repr`` of an attribution).

    >>> print(summary(decomposed.attribute(ids)))                                       # doctest: +SKIP
    Attribution(logits [1 prompt, 1 position, 1 target], 8 components + rest)
      target "' Paris'"; reconstruction error 2.1e-16
    """
    axis = attribution.component_axis
    shape = list(attribution.components.shape)
    count = shape.pop(axis)
    prompts = attribution.input_ids.shape[0]
    described = {
        "logits": ("prompt", "position", "target"), "hidden": ("prompt", "position", "feature"),
    }.get(attribution.readout, ())
    if attribution.readout == "layers":
        described = ("layer", "prompt", "position", "feature")
    dims = ", ".join(f"{n} {name}{'s' if n != 1 else ''}" for n, name in zip(shape, described)) if len(described) == len(shape) \
        else "×".join(map(str, shape))
    first = f"Attribution({attribution.readout} [{dims}], {count - 1} components + rest)"
    targets = ""
    if attribution.readout == "logits":
        names = [attribution.target_label(p) for p in range(min(prompts, 3))]
        more = f", … ({prompts} prompts)" if prompts > 3 else ""
        targets = f"target {', '.join(names)}{more}; "
    return f"{first}\n  {targets}reconstruction error {attribution.reconstruction_error():.1e}"


# -- the notebook view -----------------------------------------------------------------------------------------


def notebook_html(attribution: Attribution, count: int = 10) -> str:
    """The HTML Jupyter shows for an attribution of the ``"logits"`` readout: per prompt (the first
    :data:`SHOWN_PROMPTS`, then how many are hidden), its target and value, every component (rest included)
    coloured by its contribution at the last read position, and the ``count`` strongest; other readouts get
    :func:`fxdepass.report.attribution_html`'s projection view.

    >>> from IPython.display import HTML; HTML(notebook_html(decomposed.attribute(["a b", "c"])))   # doctest: +SKIP
    """
    if attribution.readout != "logits":
        return attribution_html(attribution, count)
    scores = attribution.scores()
    scores = scores.unsqueeze(1) if scores.ndim == 1 else scores
    prompts = scores.shape[1]
    sections = [f'<p class="meta">{_e(summary(attribution).replace(chr(10), " ·"))}</p>']
    for p in range(min(prompts, SHOWN_PROMPTS)):
        labels, values = attribution.labels_of(p), scores[:, p].tolist()
        largest = max((abs(v) for v in values[:-1]), default=0.0)
        chips = "".join(_chip(label, value, largest, f"{label}: {value:+.6g}")
                        for label, value in zip(labels, values) if not is_padding(label))
        order = sorted((i for i in range(len(values)) if not is_padding(labels[i])), key=lambda i: -abs(values[i]))[:count]
        rows = "".join(f'<tr><td class="l">{_e(labels[i])}</td><td>{values[i]:+.5g}</td></tr>' for i in order)
        sections.append(
            f'<h2>prompt {p}: target {_e(attribution.target_label(p))} = {sum(values):+.6g} '
            f'(rest {values[-1]:+.4g})</h2><div class="tokens">{chips}</div>'
            f'<table><tr><th class="l">component</th><th>score</th></tr>{rows}</table>')
    if prompts > SHOWN_PROMPTS:
        sections.append(f'<p class="note">{prompts - SHOWN_PROMPTS} more prompts are not shown '
                        "(attribution.labels_of(p), attribution.scores()[:, p]).</p>")
    return f'<div class="fxdepass"><style>{_STYLE}</style>{"".join(sections)}</div>'


def _readout_scores(attribution: Attribution) -> tuple[torch.Tensor, str]:
    """Per-component scores of an attribution for display, and what they measure."""
    if attribution.readout == "logits":
        return attribution.scores(), "contribution to the target logit (given, or the predicted token) at the last position"
    layered = attribution.component_axis == 1
    total = attribution.total[-1] if layered else attribution.total
    parts = attribution.components[-1] if layered else attribution.components
    value = total[0, -1].reshape(-1) if total.ndim >= 3 else total[0].reshape(-1)
    pieces = parts[:, 0, -1].reshape(len(parts), -1) if total.ndim >= 3 else parts[:, 0].reshape(len(parts), -1)
    norm = value.norm().clamp_min(torch.finfo(value.dtype).tiny)
    return pieces @ value / norm, f"projection on the {attribution.readout} value at the last position (they add up to its norm)"


def attribution_html(attribution: Attribution, count: int = 10) -> str:
    """A compact HTML fragment of an attribution (Jupyter's ``_repr_html_``): every component as a chip
    coloured by its score, and the ``count`` strongest in a table.

    >>> from IPython.display import HTML; HTML(attribution_html(decomposed.attribute(ids)))   # doctest: +SKIP
    """
    scores, meaning = _readout_scores(attribution)
    scores = scores if scores.ndim == 1 else scores[:, 0]
    largest = float(scores[:-1].abs().max()) if len(scores) > 1 else 0.0
    chips = "".join(_chip(label, float(s), largest, f"{label}: {float(s):+.6g}") for label, s in
                    zip(attribution.labels, scores.tolist()))
    order = scores.abs().argsort(descending=True)[:count].tolist()
    rows = "".join(f'<tr><td class="l">{_e(attribution.labels[i])}</td><td>{float(scores[i]):+.5g}</td></tr>' for i in order)
    return (f'<div class="fxdepass"><style>{_STYLE}</style>'
            f'<p class="meta">{len(scores) - 1} components + rest; score = {_e(meaning)}; sum {float(scores.sum()):+.6g}; '
            f"reconstruction error {attribution.reconstruction_error():.1e}</p>"
            f'<div class="tokens">{chips}</div><table><tr><th class="l">component</th><th>score</th></tr>{rows}</table></div>')


# -- a long-format table ---------------------------------------------------------------------------------------


def to_dataframe(attribution: Attribution) -> pandas.DataFrame:
    """One row per prompt, component, target and read position: columns ``prompt``, ``component`` (its index),
    ``label``, ``target``, ``position``, ``score`` (the component's contribution to that target's logit there).
    Padding positions' components are left out.  Needs pandas (``pip install fxdepass[data]``).

    >>> df = decomposed.attribute(["The capital of France is", "Paris is in"]).to_dataframe()   # doctest: +SKIP
    >>> df.groupby("label").score.sum().nlargest(3)                                           # doctest: +SKIP
    """
    pandas = require("pandas", "data")
    if attribution.readout != "logits":
        raise InvalidReadoutError(f"to_dataframe() needs the 'logits' readout, not {attribution.readout!r}")
    components = attribution.components.detach().cpu()                 # [C, prompts, positions, targets]
    count, prompts, read, columns = components.shape
    positions = attribution.positions if attribution.positions is not None else list(range(read))
    targets = _column_targets(attribution, prompts, columns)
    table: dict[str, list] = {name: [] for name in ("prompt", "component", "label", "target", "position", "score")}
    for p in range(prompts):
        labels = attribution.labels_of(p)
        kept = [c for c in range(count) if not is_padding(labels[c])]
        values = components[kept, p].reshape(len(kept), -1).tolist()     # [kept, positions × targets]
        for row, c in zip(values, kept):
            for j, value in enumerate(row):
                position, column = divmod(j, columns)
                table["prompt"].append(p)
                table["component"].append(c)
                table["label"].append(labels[c])
                table["target"].append(targets[p][column])
                table["position"].append(positions[position])
                table["score"].append(value)
    return pandas.DataFrame(table)


def _column_targets(attribution: Attribution, prompts: int, columns: int) -> list[list[str]]:
    """A name for each column of the last axis, per prompt: the prompt's target label, or with ``targets="all"``
    each column's token id."""
    if attribution.targets is not None:
        return [[attribution.target_label(p)] for p in range(prompts)]
    return [[str(i) for i in range(columns)]] * prompts


# -- saving and loading ----------------------------------------------------------------------------------------


def save(attribution: Attribution, path: str | Path) -> Path:
    """Write ``attribution`` to ``path`` (a safetensors file; see the module docstring) and return the path.

    >>> save(decomposed.attribute(ids), "out/attribution.safetensors")                 # doctest: +SKIP
    PosixPath('out/attribution.safetensors')
    """
    from safetensors.torch import save_file

    from . import __version__

    tensors, document = {}, {}
    for field in dataclasses.fields(attribution):
        value = getattr(attribution, field.name)
        if not field.compare:  # not part of the result (the target resolver holds the tokenizer): not saved
            continue
        if isinstance(value, torch.Tensor):
            # safetensors stores dense tensors that share no memory: copy views and expanded tensors
            tensors[field.name] = value.detach().cpu().contiguous().clone()
        elif field.name == "targets" and value is not None:
            document[field.name] = [target_to_json(t) for t in value]
        else:
            document[field.name] = _json_value(value, field.name)
    header = {"format": FORMAT, "version": VERSION, "fxdepass_version": __version__, "fields": document}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={FORMAT: json.dumps(header)})
    return path


def _json_value(value: Any, name: str) -> Any:
    try:
        text = json.dumps(value, allow_nan=True)
    except TypeError:
        raise InvalidInputError(f"cannot save the attribution's {name!r} ({type(value).__name__}): "
                                "only tensors and JSON values are saved") from None
    return json.loads(text)


def load_attribution(path: str | Path, *, device: torch.device | str = "cpu") -> Attribution:
    """Read an attribution written by :meth:`Attribution.save` (tensors on
    ``device``); never runs code from the file.

    >>> fxdepass.load_attribution("out/attribution.safetensors").scores()              # doctest: +SKIP
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as file:
            header = (file.metadata() or {}).get(FORMAT)
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except SafetensorError as error:
        raise InvalidInputError(f"{path}: not a safetensors file ({error})") from None
    if header is None:
        raise InvalidInputError(f"{path}: a safetensors file, but not an fxdepass attribution (no {FORMAT!r} header)")
    document = json.loads(header)
    if document.get("version", 0) > VERSION:
        raise InvalidInputError(f"{path} was written by fxdepass {document.get('fxdepass_version')} in a newer format "
                                f"(version {document['version']}); upgrade fxdepass to read it")
    names = {field.name for field in dataclasses.fields(Attribution)}
    values = {**document["fields"], **tensors}
    if values.get("targets") is not None:
        values["targets"] = [target_from_json(t, path) for t in values["targets"]]
    unknown = sorted(set(values) - names)
    if unknown:
        raise InvalidInputError(f"{path} has fields this fxdepass does not know: {unknown}; upgrade fxdepass")
    return Attribution(**values)


def target_to_json(target: Target) -> dict[str, Any]:
    """A target (:mod:`fxdepass.targets`) as JSON: its class name and its fields, nested targets alike.

    >>> target_to_json(fxdepass.diff(3, 7))                                             # doctest: +SKIP
    {'kind': 'Diff', 'first': {'kind': 'Token', 'token': 3}, 'second': {'kind': 'Token', 'token': 7}}
    """
    document: dict[str, Any] = {"kind": type(target).__name__}
    for field in dataclasses.fields(target):
        value = getattr(target, field.name)
        document[field.name] = target_to_json(value) if isinstance(value, Target) else _json_value(value, field.name)
    return document


def target_from_json(document: dict[str, Any], path: Path | str = "") -> Target:
    """The target :func:`target_to_json` wrote; only :mod:`fxdepass.targets`' own classes are made.

    >>> target_from_json({"kind": "Token", "token": 3})                                  # doctest: +SKIP
    Token(token=3)
    """
    from . import targets  # a module-level name `targets` would be shadowed by the many locals of that name

    kind = getattr(targets, str(document.get("kind")), None)
    if not (isinstance(kind, type) and issubclass(kind, targets.Target) and dataclasses.is_dataclass(kind)):
        raise InvalidInputError(f"{path}: unknown target kind {document.get('kind')!r}; upgrade fxdepass")
    fields = {}
    for name, value in document.items():
        if name != "kind":
            fields[name] = (target_from_json(value, path) if isinstance(value, dict)
                            else tuple(value) if isinstance(value, list) else value)
    return kind(**fields)


def json_number(value: float) -> float | str:
    """``value`` for JSON: finite numbers as they are, NaN and infinities as the strings ``"nan"``, ``"inf"``,
    ``"-inf"`` (strict JSON has no such numbers).

    >>> json_number(float("inf")), json_number(0.5)
    ('inf', 0.5)
    """
    return value if math.isfinite(value) else str(value)
