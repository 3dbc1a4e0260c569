"""Attributions as data: a short summary, the notebook view, a long-format table, and saving and loading.

:class:`~fxdepass.api.Attribution` delegates to these functions (``repr``, ``_repr_html_``, ``to_dataframe``,
``save``); :func:`load_attribution` reads a saved attribution back.

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

from .errors import InvalidInputError, InvalidReadoutError, MissingDependencyError
from .seeds import is_padding

if TYPE_CHECKING:
    import pandas

    from .api import Attribution
    from .targets import Target

__all__ = ["summary", "notebook_html", "to_dataframe", "save", "load_attribution", "target_to_json", "target_from_json",
           "json_number", "FORMAT"]

#: the name under which the JSON document sits in the safetensors header, and its format version
FORMAT = "fxdepass.attribution"
VERSION = 1
#: prompts the notebook view shows before saying how many more there are
SHOWN_PROMPTS = 8


def _target_label(attribution: Attribution, prompt: int) -> str:
    if attribution.target_labels:
        return attribution.target_labels[prompt]
    return "every logit" if attribution.readout == "logits" else "none"


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
        names = [_target_label(attribution, p) for p in range(min(prompts, 3))]
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
    from .report import _STYLE, _chip, _e, attribution_html  # report builds on api: import when shown

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
            f'<h2>prompt {p}: target {_e(_target_label(attribution, p))} = {sum(values):+.6g} '
            f'(rest {values[-1]:+.4g})</h2><div class="tokens">{chips}</div>'
            f'<table><tr><th class="l">component</th><th>score</th></tr>{rows}</table>')
    if prompts > SHOWN_PROMPTS:
        sections.append(f'<p class="note">{prompts - SHOWN_PROMPTS} more prompts are not shown '
                        "(attribution.labels_of(p), attribution.scores()[:, p]).</p>")
    return f'<div class="fxdepass"><style>{_STYLE}</style>{"".join(sections)}</div>'


# -- a long-format table ---------------------------------------------------------------------------------------


def to_dataframe(attribution: Attribution) -> pandas.DataFrame:
    """One row per prompt, component, target and read position: columns ``prompt``, ``component`` (its index),
    ``label``, ``target``, ``position``, ``score`` (the component's contribution to that target's logit there).
    Padding positions' components are left out.  Needs pandas (``pip install fxdepass[data]``).

    >>> df = decomposed.attribute(["The capital of France is", "Paris is in"]).to_dataframe()   # doctest: +SKIP
    >>> df.groupby("label").score.sum().nlargest(3)                                           # doctest: +SKIP
    """
    pandas = _require("pandas", "data")
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
        return [[_target_label(attribution, p)] for p in range(prompts)]
    return [[str(i) for i in range(columns)]] * prompts


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"this needs {module}, which is not installed: pip install 'fxdepass[{extra}]' "
                                     f"(or pip install {module})") from None


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
    """Read an attribution written by :meth:`Attribution.save <fxdepass.api.Attribution.save>` (tensors on
    ``device``); never runs code from the file.

    >>> fxdepass.load_attribution("out/attribution.safetensors").scores()              # doctest: +SKIP
    """
    from safetensors import SafetensorError, safe_open

    from .api import Attribution

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
    from .targets import Target

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
    from . import targets

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
