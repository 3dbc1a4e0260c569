"""Many prompts: batched by length through one compiled model, with progress, and a resumable JSONL file of results.

>>> for record in decomposed.attribute_dataset(prompts, batch_size=16):                   # doctest: +SKIP
...     print(record.prompt, record.target, record.top(3))
>>> write_results(decomposed, read_prompts("prompts.jsonl"), "results.jsonl")              # doctest: +SKIP

Note [Resuming]
The prompts are put in batches once, from all of them (sorted by token count, then cut every ``batch_size``),
whatever is already done.  A batch is computed in full when any of its prompts is still to do, and only those
prompts are written.  So a resumed run computes every prompt in the same batch, with the same padding, as an
uninterrupted run would, and writes the same lines in the same order.  Lines are appended a batch at a time,
each batch flushed and synced to disk; a run killed while writing can leave at most one incomplete last line,
which the next run cuts off before it appends.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterator, Sequence

import torch

from .errors import InvalidInputError
from .files import check_output, open_output, output_directory
from .inputs import pad, pad_id, tokenize
from .results import json_number
from .seeds import Seed, Tokens, is_padding, tokens

if TYPE_CHECKING:
    from .api import Attribution, DecomposedModel
    from .locations import Locations

__all__ = ["Record", "attribute_dataset", "attribute_batches", "plan_batches", "read_prompts", "write_results", "completed"]


@dataclasses.dataclass
class Record:
    """One prompt's result within its batch's attribution: ``attribution`` holds the whole batch, ``row`` is
    this prompt's place in it; ``index`` is its place among the prompts given."""

    index: int
    prompt: Any
    attribution: Attribution
    row: int
    #: the batch this prompt was computed in (numbered in the order the batches run)
    batch: int
    #: the labels of the components :meth:`scores` gives, as the prompt alone would get them (rest last)
    labels: list[str]

    def scores(self) -> torch.Tensor:
        """Each component's contribution to the prompt's target at its last position, padding left out.

        >>> record.scores().sum()          # the target's value (record.logit), exactly        # doctest: +SKIP
        """
        values = self.attribution.scores()
        values = values if values.ndim == 1 else values[:, self.row]
        kept = [i for i, label in enumerate(self.attribution.labels_of(self.row)) if not is_padding(label)]
        return values[kept]

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` components with the largest absolute scores, with their labels.

        >>> record.top(2)                                                                   # doctest: +SKIP
        [("tok 3 ' France'", 2.83), ("tok 1 ' capital'", 2.05)]
        """
        values = self.scores()
        return [(self.labels[i], float(values[i])) for i in values.abs().argsort(descending=True)[:k].tolist()]

    @property
    def target(self) -> str:
        """The target's label (e.g. ``"' Paris'"``)."""
        return self.attribution.target_labels[self.row]

    @property
    def logit(self) -> float:
        """The real value of the target at the last position."""
        return float(self.attribution.target_values[self.row, -1])

    def reconstruction_error(self) -> float:
        """Max relative error of this prompt's components' sum against its real value.

        >>> record.reconstruction_error() <= 1e-9                                            # doctest: +SKIP
        True
        """
        a = self.attribution
        components = a.components.select(a.component_axis + 1, self.row)
        total = a.total.select(1 if a.component_axis == 1 else 0, self.row)
        error = (components.sum(a.component_axis) - total).abs().max()
        return float(error / total.abs().max().clamp_min(torch.finfo(total.dtype).tiny))

    def tokens(self, tokenizer: Any = None) -> list[str]:
        """The prompt's tokens (padding left out): texts with ``tokenizer``, else ids as strings.

        >>> record.tokens(tokenizer)                                                         # doctest: +SKIP
        ['The', ' capital', ' of', ' France', ' is']
        """
        ids, mask = self.attribution.input_ids[self.row].tolist(), self._mask()
        kept = [t for t, m in zip(ids, mask) if m]
        return [tokenizer.decode([t]) for t in kept] if tokenizer is not None else [str(t) for t in kept]

    def _mask(self) -> list[int]:
        mask = self.attribution.attention_mask
        return [1] * self.attribution.input_ids.shape[1] if mask is None else mask[self.row].tolist()

    def to_json(self, tokenizer: Any = None) -> dict[str, Any]:
        """The record as one JSON object: index, prompt, tokens, target, labels, scores (rest last), logit and
        reconstruction error.

        >>> json.dumps(record.to_json(tokenizer))                                          # doctest: +SKIP
        """
        return {"index": self.index, "prompt": self.prompt, "tokens": self.tokens(tokenizer), "target": self.target,
                "labels": self.labels, "scores": [json_number(v) for v in self.scores().tolist()],
                "logit": json_number(self.logit), "reconstruction_error": json_number(self.reconstruction_error())}


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of at most ``batch_size`` prompts of similar length (sorted by length, ties in
    order), so that little padding is computed.

    >>> plan_batches([5, 2, 9, 2, 5], 2)
    [[1, 3], [0, 4], [2]]
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def attribute_dataset(decomposed: DecomposedModel, prompts: Sequence[Any], *, batch_size: int = 8, targets: Any = None,
                      skip: Collection[int] = (), progress: bool | None = None, **attribute_kwargs: Any) -> Iterator[Record]:
    """Attribute every prompt (texts, or lists of token ids), ``batch_size`` at a time, batched by length, and
    yield one :class:`Record` per prompt in the order the batches run.  ``targets``: one target for every
    prompt, or a list with one per prompt (as ``attribute`` takes them).  ``skip``: indices of prompts not to
    yield (done before; Note [Resuming]).  ``progress``: a tqdm bar on stderr (``None``: when tqdm is installed
    and stderr is a terminal).  Other keyword arguments go to ``attribute`` (``seed``, ``strict``, …; the
    readout is ``"logits"``).

    >>> records = list(decomposed.attribute_dataset(["The capital of France is", "Paris is in"]))   # doctest: +SKIP
    """
    for batch in attribute_batches(decomposed, prompts, batch_size=batch_size, targets=targets, skip=skip,
                                   progress=progress, **attribute_kwargs):
        yield from batch


def attribute_batches(decomposed: DecomposedModel, prompts: Sequence[Any], *, batch_size: int = 8, targets: Any = None,
                      skip: Collection[int] = (), progress: bool | None = None,
                      **attribute_kwargs: Any) -> Iterator[list[Record]]:
    """:func:`attribute_dataset` a batch at a time: each computed batch's records (those not skipped) together.

    >>> next(attribute_batches(decomposed, prompts, batch_size=4))[0].top(3)                # doctest: +SKIP
    """
    prompts = list(prompts)
    seed = attribute_kwargs.get("seed")
    seed = tokens() if seed is None else seed
    per_prompt = isinstance(targets, (list, tuple))
    if per_prompt and len(targets) != len(prompts):
        raise InvalidInputError(f"targets has {len(targets)} entries for {len(prompts)} prompts; give one per prompt "
                                "or one for all")
    rows = [tokenize(p, decomposed.tokenizer) if isinstance(p, str) else _ids(p, i) for i, p in enumerate(prompts)]
    plan = plan_batches([len(r) for r in rows], batch_size)
    skip = set(skip)
    bar = _bar(sum(1 for i in range(len(prompts)) if i not in skip), progress)
    number = 0
    try:
        for batch in plan:
            wanted = [i for i in batch if i not in skip]
            if not wanted:
                continue
            ids, mask = pad([rows[i] for i in batch], pad_id(decomposed.tokenizer), left=decomposed.causal,
                            device=decomposed.device)
            given = [targets[i] for i in batch] if per_prompt else targets
            attribution = decomposed.attribute(ids, attention_mask=mask, targets=given, **attribute_kwargs)
            where = decomposed.locations_for(decomposed.prompt_inputs(ids, mask))
            if bar is not None:
                bar.update(len(wanted))
            yield [Record(i, prompts[i], attribution, row, number,
                          _own_labels(attribution, row, rows[i], seed, where, decomposed.tokenizer))
                   for row, i in enumerate(batch) if i in wanted]
            number += 1
    finally:
        if bar is not None:
            bar.close()


def _own_labels(attribution: Attribution, row: int, ids: list[int], seed: Seed, where: Locations, tokenizer: Any) -> list[str]:
    """A prompt's labels without its padding, as the prompt alone gets them: token components number the
    prompt's own positions, not the padded batch's."""
    if isinstance(seed, Tokens) and seed.groups is None:
        return seed.labels(torch.tensor([ids]), where, tokenizer)
    return [label for label in attribution.labels_of(row) if not is_padding(label)]


def _ids(prompt: Any, index: int) -> list[int]:
    ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(t, int) for t in ids):
        raise InvalidInputError(f"prompt {index} must be a text or a non-empty list of token ids, got {prompt!r}")
    return list(ids)


def _bar(total: int, progress: bool | None) -> Any:
    """A tqdm bar of ``total`` prompts, or ``None``: when asked not to, or (by default) without tqdm or a terminal."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="prompt", desc="fxdepass", file=sys.stderr)


# -- prompts files and the resumable results file -----------------------------------------------------------------


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompts of a file: JSON lines, each a string or an object with ``"prompt"`` (and optionally
    ``"target"``, a token string or id, and ``"foil"``: the target becomes the logit difference target − foil);
    a ``.txt`` file holds one prompt per line.  Blank lines are skipped.

    >>> read_prompts("prompts.jsonl")[0]                                                 # doctest: +SKIP
    {'prompt': 'The capital of France is', 'target': ' Paris', 'foil': ' Berlin'}
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise InvalidInputError(f"cannot read the prompts file {path}: {error.strerror}") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            entries.append({"prompt": line})
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"{path}:{number}: not JSON ({error.msg}); each line is a JSON string or an "
                                    'object like {"prompt": "…", "target": " Paris"}') from None
        entry = {"prompt": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise InvalidInputError(f'{path}:{number}: expected a string or an object with a "prompt" string')
        unknown = sorted(set(entry) - {"prompt", "target", "foil"})
        if unknown or ("foil" in entry and "target" not in entry):
            raise InvalidInputError(f"{path}:{number}: " + (f"unknown keys {unknown}" if unknown else
                                                            '"foil" needs a "target"') + ' (keys: prompt, target, foil)')
        entries.append(entry)
    if not entries:
        raise InvalidInputError(f"the prompts file {path} holds no prompts")
    return entries


def completed(path: str | Path) -> dict[int, str]:
    """The prompts already in a results file (index → prompt), after cutting off an incomplete last line
    (what a killed run can leave; Note [Resuming]).  Any other line that is not a result is an error: the
    file is left as it is.

    >>> completed("results.jsonl")                                                       # doctest: +SKIP
    {0: 'The capital of France is', 3: 'Paris is in'}
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):                                # a partial last line: cut it off
        with open_output(path, "ab") as file:
            file.truncate(end)
            file.flush()
            os.fsync(file.fileno())
    done = {}
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            done[int(record["index"])] = record["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InvalidInputError(f"{path}:{number} is not an fxdepass result line; give another --out file "
                                    "or remove it") from None
    return done


def _json_line(value: Any) -> str:
    """``value`` as one line of JSON that UTF-8 can hold: other characters as they are, but a lone surrogate (a token
    cut inside a character) as its \\u escape, which a JSON reader turns back into it (Note [Text in files])."""
    text = json.dumps(value, ensure_ascii=False)
    return re.sub("[\ud800-\udfff]", lambda match: f"\\u{ord(match.group()):04x}", text) + "\n"


def write_results(decomposed: DecomposedModel, entries: Sequence[dict[str, Any]], out: str | Path, *,
                  batch_size: int = 8, progress: bool | None = None, **attribute_kwargs: Any) -> tuple[int, int]:
    """Append one JSON line per prompt of ``entries`` (from :func:`read_prompts`) to ``out``, skipping the prompts
    already there (Note [Resuming]); returns (prompts written, prompts skipped).

    >>> write_results(decomposed, read_prompts("prompts.jsonl"), "results.jsonl")       # doctest: +SKIP
    (120, 0)
    """
    from .targets import diff

    out = check_output(out, append=True)               # a results file, or none yet; never a link (fxdepass.files)
    done = completed(out)
    for index, prompt in done.items():
        if index >= len(entries) or entries[index]["prompt"] != prompt:
            raise InvalidInputError(f"{out} holds a result for prompt {index} ({prompt!r}) that the prompts file does "
                                    "not have at that line; give another --out file for these prompts")
    targets = [diff(e["target"], e["foil"]) if "foil" in e else e.get("target") for e in entries]
    records = attribute_batches(decomposed, [e["prompt"] for e in entries], batch_size=batch_size,
                                targets=targets if any(t is not None for t in targets) else None,
                                skip=done, progress=progress, **attribute_kwargs)
    output_directory(out.parent)
    written = 0
    with open_output(out, "a") as file:
        for batch in records:
            file.write("".join(_json_line(r.to_json(decomposed.tokenizer)) for r in batch))
            file.flush()
            os.fsync(file.fileno())
            written += len(batch)
    return written, len(done)
