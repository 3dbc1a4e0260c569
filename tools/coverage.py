"""Coverage report: does fxdepass give exact token-level attributions for every text model in transformers?

Walks every text-only causal LM (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: ``*ForCausalLM`` and
``*LMHeadModel``, the standalone decoders of encoder-decoder families such as ``BartForCausalLM``
included) and every bidirectional text encoder (``MODEL_MAPPING_NAMES`` of the model types with a
masked-LM head that are not encoder-decoders) that the installed transformers exposes; every model
type with such a head that is left out is listed with its reason (:func:`skipped`).  It builds a
tiny random model of each from its config class's defaults (see Note [Tiny configs]), compiles it in
float64, attributes a prompt token by token and writes ``docs/coverage.md``.  Each model runs in its
own forked process with a timeout, two at a time.

    python tools/coverage.py                       # the full walk (make coverage)
    python tools/coverage.py --only llama,mixtral  # a few families, report printed, docs untouched
    python tools/coverage.py --update --only bart  # re-run a few families' rows of docs/coverage.md

Note [Tiny configs]
~~~~~~~~~~~~~~~~~~~
A family's config class already knows how the family fits together; only its sizes are too large.
:func:`tiny_config` starts from the class defaults and

* shrinks every size-like field it knows by name (:data:`SIZES`: depth, width, heads, feed-forward,
  experts, latent ranks, vocabulary, positions, windows) to at most a small value; a field keeps its
  default when that is already smaller;
* keeps the family's attention grouping: key-value heads shrink with the query heads (MHA stays MHA,
  GQA stays GQA, MQA stays MQA);
* cuts per-layer lists (``layer_types``) to the two layers, keeping one layer of each kind, and drops
  per-layer settings of layers that no longer exist;
* moves token ids into the small vocabulary, and fills the few fields whose ``None`` default the
  modelling code cannot take (:data:`FILL`).

:data:`OVERRIDES` holds what a family needs beyond that, each entry with its reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import re
import sys
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto import configuration_auto, modeling_auto  # noqa: E402

import fxdepass  # noqa: E402
from fxdepass.capture import run_options  # noqa: E402
from fxdepass.errors import CaptureError, InvalidSeedError, UnsupportedOpError  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"
COMMAND = "make coverage"
LAYERS, HEADS, HEAD_DIM = 2, 4, 16
VOCAB = 128
#: float64 tolerance of SPEC §5
EXACT = 1e-9
#: rest share above which the tokens get almost nothing (under a thousandth): exact sums, but degenerate.
#: Not lower: in the tiny random models, biases (perturbed by 0.1 against embeddings of standard
#: deviation 0.02) alone can hold most of a logit — 0.96 in gpt_neo, 0.91 in gptj — which is the model,
#: not a failure of the attribution.
DEGENERATE = 0.999
#: the float64 real pass against the model's own float32 output (SPEC §5's float32 tolerance)
SAME_REAL = 1e-4

DEPTH = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers")
HEAD_COUNTS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "decoder_attention_heads",
               "encoder_attention_heads")
KV_HEAD_COUNTS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")

#: Note [Tiny configs]: size-like field → its largest value in a tiny model
SIZES: dict[str, int] = {
    **dict.fromkeys(DEPTH, LAYERS),
    **dict.fromkeys(["hidden_size", "n_embd", "d_model", "dim", "emb_dim", "embedding_size", "word_embed_proj_dim",
                     "input_embedding_size", "output_embedding_size", "embedding_dim"], HEADS * HEAD_DIM),
    **dict.fromkeys([*HEAD_COUNTS, "index_num_heads", "linear_num_heads", "linear_num_key_heads",
                     "linear_num_value_heads"], HEADS),
    **dict.fromkeys(["head_dim", "kv_channels", "d_head", "attention_head_size", "v_head_dim", "qk_rope_head_dim",
                     "qk_nope_head_dim", "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim"], HEAD_DIM),
    **dict.fromkeys(["intermediate_size", "ffn_dim", "ffn_hidden_size", "hidden_dim", "d_ff", "dff", "d_inner",
                     "dim_ff", "intermediate_size_mlp", "dense_intermediate_size", "decoder_ffn_dim",
                     "encoder_ffn_dim"], 128),
    **dict.fromkeys(["moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
                     "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size",
                     "expert_ffn_hidden_size"], 32),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "moe_k", "n_group",
                     "num_expert_group"], 2),
    **dict.fromkeys(["topk_group", "n_shared_experts", "first_k_dense_replace"], 1),
    "kv_lora_rank": 16, "q_lora_rank": 32, "rotary_dim": HEAD_DIM // 2,
    "num_kv_shared_layers": 0,  # layers reusing an earlier layer's cache: none of two
    "vocab_size": VOCAB,
    **dict.fromkeys(["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"], 128),
    # Smaller than the prompt, so that sliding-window masks matter.
    **dict.fromkeys(["sliding_window", "attention_window_size", "sliding_window_size"], 4),
}

#: Fields whose ``None`` default means "derive me" but that some modelling code reads as is.
FILL: dict[str, int] = {"head_dim": HEAD_DIM, "num_key_value_heads": HEADS, "num_experts_per_tok": 2,
                        "n_routed_experts": 4, "n_shared_experts": 1, "vocab_size": VOCAB}

#: Note [Tiny configs]: the few fields a family needs beyond shrinking, each with its reason
OVERRIDES: dict[str, dict[str, Any]] = {
    # Its default config leaves layer_types unset (every checkpoint sets it) but the model indexes it.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # Mamba-2 needs num_heads · head_dim = expand · hidden_size (2 · 64), which shrinking each alone breaks.
    "mamba2": {"num_heads": 8},
    # Zamba ties every hybrid layer's shared transformer to the first one's, which fails with a single
    # hybrid layer (what the one-of-each-kind cut gives); two hybrid layers keep the sharing.
    "zamba": {"layers_block_type": ["hybrid", "hybrid"]},
    # Its default is Mamba layers only, which its own cache handling cannot run (and no hybrid at all).
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # Its default config has no rotary settings for its attention layers, which the model indexes by layer type.
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # ESM derives position ids from the padding token, which its default config leaves unset.
    "esm": {"pad_token_id": 1},
}


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its ``model_type`` and the class the walk builds (``*ForCausalLM`` or ``*Model``)."""

    model_type: str
    class_name: str
    encoder: bool


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome for one family; ``status`` is ``"exact"`` or a specific reason."""

    family: Family
    status: str
    error: float | None = None
    seconds: float | None = None
    exported: bool = False
    #: share of the target's attribution left in rest (see :func:`rest_share`)
    rest: float | None = None

    @property
    def exact(self) -> bool:
        return self.status == "exact"


def _non_text_types() -> dict[str, str]:
    """Model types of multimodal, vision and audio models, each with the reason it is one.

    Found from the auto mappings for those tasks, and from configs with a vision or audio sub-config.
    """
    kinds = ("IMAGE", "VISION", "VIDEO", "AUDIO", "SPEECH", "MULTIMODAL", "CTC", "WAVEFORM", "SPECTROGRAM",
             "VISUAL", "DOCUMENT")
    names = [n for n in dir(modeling_auto) if n.endswith("_MAPPING_NAMES") and any(k in n for k in kinds)]
    types = {t: f"not text-only: in {n.removesuffix('_NAMES')}" for n in sorted(names) for t in getattr(modeling_auto, n)}
    for model_type, config in configuration_auto.CONFIG_MAPPING.items():
        subs = [key for key in getattr(config, "sub_configs", {}) if "audio" in key or "vision" in key]
        if subs and model_type not in types:
            types[model_type] = f"not text-only: has a {subs[0]}"
    return types


def _encoder_decoders() -> set[str]:
    """Model types that are encoder-decoders (a sequence-to-sequence head): their ``*Model`` needs decoder
    inputs, but their ``*ForCausalLM`` is a standalone decoder the walk takes."""
    names = [n for n in dir(modeling_auto) if n.endswith("_MAPPING_NAMES") and "SEQ_TO_SEQ" in n]
    return {t for n in names for t in getattr(modeling_auto, n)}


def skipped() -> dict[str, str]:
    """The model types with a causal-LM or masked-LM head that the walk leaves out, each with its reason.

    >>> "llama" in skipped(), "bart" in skipped()
    (False, False)
    """
    heads = set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return {t: reason for t, reason in sorted(_non_text_types().items()) if t in heads}


def families() -> list[Family]:
    """Every text-only decoder (``*ForCausalLM``, ``*LMHeadModel``) and bidirectional encoder (``*Model``),
    sorted, one per class.

    >>> any(f.class_name == "LlamaForCausalLM" for f in families())
    True
    """
    skip = set(_non_text_types())
    encoders = set(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) - skip - _encoder_decoders()
    decoders = set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - skip - encoders
    found: dict[str, Family] = {}
    for model_type in sorted(decoders | encoders):
        mapping = modeling_auto.MODEL_MAPPING_NAMES if model_type in encoders else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        name = mapping.get(model_type)
        if not isinstance(name, str):
            continue
        if name not in found or _ownership(model_type, name) > _ownership(found[name].model_type, name):
            found[name] = Family(model_type, name, encoder=model_type in encoders)
    return sorted(found.values(), key=lambda f: (f.encoder, f.model_type))


def _ownership(model_type: str, class_name: str) -> int:
    """How much ``class_name`` is ``model_type``'s own: 2 when its name starts with the type's config
    class name (``DeepseekV3ForCausalLM``, ``DeepseekV3Config``), 1 when the type's config is its own (not
    an alias such as internlm3 → ``LlamaConfig``), 0 for an alias.  Types sharing a class (sarvam_mla's
    ``DeepseekV3ForCausalLM``) give way to the class's own type.

    >>> _ownership("llama", "LlamaForCausalLM")
    2
    """
    config = configuration_auto.CONFIG_MAPPING[model_type]
    if config.model_type != model_type:
        return 0
    return 2 if class_name.startswith(config.__name__.removesuffix("Config")) else 1


def _shrink(name: Any, value: Any, default_layers: int | None) -> Any:
    """The tiny value of one config field (Note [Tiny configs]); sub-configs are shrunk field by field.

    >>> _shrink("hidden_size", 4096, 32), _shrink("layer_types", ["sliding", "sliding", "full"], 3)
    (64, ['sliding', 'full'])
    """
    if isinstance(value, dict):
        if _per_layer(name, value):
            return {k: v for k, v in value.items() if int(k) < LAYERS}
        depth = next((value[k] for k in DEPTH if isinstance(value.get(k), int)), default_layers)
        return {k: _shrink(k, v, depth) for k, v in value.items()}
    if name in SIZES and isinstance(value, int) and not isinstance(value, bool):
        return min(value, SIZES[name])
    if re.fullmatch(r".*_token_(id|index)", str(name)) and isinstance(value, int) and value >= VOCAB:
        return value % VOCAB
    if isinstance(value, list) and default_layers and len(value) == default_layers > LAYERS:
        return _first_of_each_kind(value)
    return value


def _first_of_each_kind(per_layer: list) -> list:
    """``LAYERS`` entries of a per-layer list (``layer_types``): each kind it has, in order of first use.

    >>> _first_of_each_kind(["sliding_attention"] * 5 + ["full_attention"])
    ['sliding_attention', 'full_attention']
    """
    kinds: list = []
    for entry in per_layer:
        if entry not in kinds:
            kinds.append(entry)
    return (kinds + per_layer)[:LAYERS]


def _per_layer(name: Any, value: dict) -> bool:
    """Whether a config field holds per-layer settings keyed by layer index (``per_layer_config``)."""
    return "layer" in str(name) and bool(value) and all(str(k).isdigit() for k in value)


def _kv_heads(kv_heads: int, heads: int) -> int:
    """Key-value heads of the tiny model, keeping the family's grouping (MHA stays MHA, GQA stays GQA)."""
    wanted = HEADS * kv_heads // heads
    return next(d for d in (HEADS, HEADS // 2, 1) if d <= max(wanted, 1))


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """A tiny config of ``model_type``: class defaults with every size-like field shrunk.

    >>> tiny_config("llama").num_hidden_layers, tiny_config("llama").hidden_size
    (2, 64)
    """
    cls = configuration_auto.CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    layers = next((defaults[k] for k in DEPTH if isinstance(defaults.get(k), int)), None)
    heads = next((defaults[k] for k in HEAD_COUNTS if isinstance(defaults.get(k), int)), None)
    fields = {k: _shrink(k, v, layers) for k, v in defaults.items()}
    for name in KV_HEAD_COUNTS:
        if isinstance(defaults.get(name), int) and heads:
            fields[name] = _kv_heads(defaults[name], heads)
    fields.update({k: v for k, v in FILL.items() if k in defaults and defaults[k] is None})
    changed = {k: v for k, v in fields.items() if v != defaults[k]}
    return cls(**{**changed, **OVERRIDES.get(model_type, {})})


def build(family: Family, config: transformers.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A random ``family`` model of ``config`` in eval mode; 1-d parameters (norm weights, biases) perturbed so they matter."""
    mapping = modeling_auto.MODEL_MAPPING_NAMES if family.encoder else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cls = getattr(transformers, mapping[family.model_type])
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


#: What to do about failures whose message does not say it (matched against the message).
HINTS = {
    "DynamicCache": "the model returns its cache although fxdepass/capture.py passes use_cache=False",
    "GuardOnDataDependentSymNode": "data-dependent control flow in the model, which torch.export cannot trace",
}


def _reason(error: BaseException) -> str:
    """``Type: message`` of an error on one line, short enough for a table cell, with a hint and where it was raised."""
    text = f"{type(error).__name__}: " + " ".join(str(error).split()).split(". Things to try")[0]
    notes = [hint for key, hint in HINTS.items() if key in text]
    if not isinstance(error, fxdepass.FxDePassError):
        notes += [_origin(error)] if _origin(error) else []
    return text[:160] + (f" ({'; '.join(notes)})" if notes else "")


def _origin(error: BaseException) -> str | None:
    """Where an unexpected error was raised: the innermost transformers frame and the fxdepass frame that called it.

    >>> _origin(ValueError()) is None        # raised nowhere in either
    True
    """
    frames = traceback.extract_tb(error.__traceback__)
    places = []
    for library in ("transformers", "fxdepass|rules"):
        inside = [f for f in frames if re.search(rf"/({library})/", f.filename)]
        if inside:
            places.append(f"{Path(inside[-1].filename).parent.name}/{Path(inside[-1].filename).name}:{inside[-1].lineno}")
    return "at " + ", from ".join(places) if places else None


def _forward(model: torch.nn.Module, ids: torch.Tensor, readout: str) -> torch.Tensor:
    """The model's own output for ``readout``, run as fxdepass runs it (all tokens attended, no cache)."""
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(ids), **run_options(model)}
    with torch.no_grad():
        output = model(input_ids=ids, **kwargs)
    return output.logits if readout == "logits" else output.last_hidden_state


def check(family: Family) -> Result:
    """Build, compile and attribute one family in float64; never raises.

    The model stays in float32 (some kernels, such as ``grouped_mm``, have no float64 CPU version);
    ``fxdepass.compile(..., dtype=torch.float64)`` runs both passes in float64 (SPEC §5).

    >>> check(Family("llama", "LlamaForCausalLM", encoder=False)).status   # doctest: +SKIP
    'exact'
    """
    try:
        config = tiny_config(family.model_type)
    except Exception as error:  # a config the shrinking broke, or a broken default config
        return Result(family, f"config failed: {_reason(error)}")
    readout = "hidden" if family.encoder else "logits"
    vocabulary = min(VOCAB, getattr(config, "vocab_size", None) or VOCAB)
    ids = torch.randint(0, vocabulary, (2, 8), generator=torch.Generator().manual_seed(1))
    try:
        model = build(family, config)
        ordinary = _forward(model, ids, readout)
    except Exception as error:  # the model itself cannot be built or run
        return Result(family, f"model failed: {_reason(error)}")
    start = time.perf_counter()
    try:
        decomposed = fxdepass.compile(model, dtype=torch.float64, example_inputs=ids)
    except CaptureError as error:
        return Result(family, f"export failed: {_reason(error.__cause__ or error)}")
    except UnsupportedOpError as error:
        found = re.search(r"no DePass rule for (\S+) \(node \S+\) at (\S+)", str(error))
        where = f"unsupported op {found.group(1)} in {found.group(2)}" if found else _reason(error)
        return Result(family, where, exported=True)
    except InvalidSeedError as error:
        return Result(family, f"token seed not found: {_reason(error)} (fxdepass/locations.py)", exported=True)
    except Exception as error:
        return Result(family, f"compile failed: {_reason(error)}", exported=True)
    seconds = time.perf_counter() - start
    try:
        attribution = decomposed.attribute(ids, positions="all", targets="all", readout=readout)
    except Exception as error:
        return Result(family, f"attribution failed: {_reason(error)}", seconds=seconds, exported=True)
    error = attribution.reconstruction_error()
    real = _relative(attribution.total.to(ordinary.dtype), ordinary)
    rest = rest_share(attribution.components, encoder=family.encoder)
    return Result(family, _verdict(error, real, rest), error, seconds, exported=True, rest=rest)


def rest_share(components: torch.Tensor, *, encoder: bool) -> float:
    """The share of the target's attribution left in rest: ``Σ|rest| / Σ|component|`` (rest included) at
    the last position, for each prompt's predicted token (decoders) or every feature (encoders).
    Near 1, the tokens get almost nothing: the sum is exact but the attribution degenerate.

    >>> rest_share(torch.tensor([[[[3.0, 0.0]]], [[[1.0, 2.0]]]]), encoder=False)   # token 0 predicted
    0.25
    """
    last = components[:, :, -1]  # [components, prompts, targets]
    if not encoder:
        predicted = last.sum(0).argmax(-1)
        last = last.gather(2, predicted.reshape(1, -1, 1).expand(last.shape[0], -1, 1))
    magnitude = last.abs()
    return float(magnitude[-1].sum() / magnitude.sum().clamp_min(1e-30))


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value − reference| / max |reference|."""
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _verdict(error: float, real: float, rest: float = 0.0) -> str:
    """``"exact"``, or what is wrong: the sum of the components, the real pass itself, or tokens that get
    almost nothing (rest share above :data:`DEGENERATE`).

    >>> _verdict(1e-15, 1e-7), _verdict(1e-6, 1e-7), _verdict(1e-15, 1e-7, 1.0)[:10]
    ('exact', 'wrong sum', 'degenerate')
    """
    if not error <= EXACT:
        return "wrong sum"
    if not real <= SAME_REAL:
        return f"real pass differs from the model (relative error {real:.1e})"
    if rest > DEGENERATE:
        return f"degenerate: the sum is exact but rest holds {rest:.2f} of the target (the tokens get almost nothing)"
    return "exact"


def _child(family: Family, connection: Connection) -> None:
    """The body of one worker process: one thread (two workers share two cores), one family.

    Models are built in float32 whatever default the parent process set (the test suite sets float64).
    """
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    connection.send(check(family))
    connection.close()


def _start(context: Any, family: Family) -> tuple[Connection, multiprocessing.Process]:
    """Fork a worker checking ``family``; its result arrives on the returned connection."""
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(family, sender), daemon=True)
    process.start()
    sender.close()
    return receiver, process


def run(todo: list[Family], jobs: int = 2, timeout: float = 300.0) -> list[Result]:
    """:func:`check` every family in a forked process, ``jobs`` at a time; a hung one becomes a timeout row.

    >>> run([Family("llama", "LlamaForCausalLM", encoder=False)])[0].status   # doctest: +SKIP
    'exact'
    """
    context = multiprocessing.get_context("fork")  # the workers inherit the imported torch and transformers
    pending, running, results = list(todo), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            family = pending.pop(0)
            receiver, process = _start(context, family)
            running[receiver] = (family, process, time.monotonic())
        finished = []
        for receiver in wait(list(running), timeout=1.0):
            family, process, _ = running.pop(receiver)
            try:
                finished.append(receiver.recv())
            except EOFError:
                finished.append(Result(family, f"crashed (exit code {process.exitcode})"))
            process.join()
        for receiver, (family, process, started) in list(running.items()):
            if time.monotonic() - started > timeout:
                process.kill()
                process.join()
                del running[receiver]
                finished.append(Result(family, f"timed out after {timeout:.0f} s"))
        for result in finished:
            results[result.family] = result
            print(f"[{len(results)}/{len(todo)}] {result.family.model_type}: {result.status}", file=sys.stderr, flush=True)
    return [results[f] for f in todo]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary(results: list[Result]) -> str:
    """The headline: how many text-only decoder families export cleanly, and how many of those are exact."""
    decoders = [r for r in results if not r.family.encoder]
    exported = [r for r in decoders if r.exported]
    exact = [r for r in exported if r.exact]
    encoders = [r for r in results if r.family.encoder]
    return (f"**{_percent(len(exact), len(exported))}** of the text-only decoder families that export cleanly are "
            f"exact ({len(exact)} of {len(exported)}); of all {len(decoders)} decoder families, "
            f"{_percent(len(exact), len(decoders))} export cleanly and are exact ({len(decoders) - len(exported)} "
            f"fail to configure, run or export). Encoders: {sum(r.exact for r in encoders)} of {len(encoders)} exact.")


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / max(whole, 1):.0f}%"


def previous_rows(text: str) -> tuple[str, float, int, dict[str, Result]]:
    """An earlier report's transformers version, walk minutes and families at a time, and its rows (by
    model type), so that
    ``--update`` can re-run a few families and keep the others.

    >>> previous_rows("with transformers 5.23.0 and torch 2.13, 2 families at a time, in 9 minutes\\n"
    ...               "## Decoders\\n| llama | LlamaForCausalLM | exact | 6.6e-16 | 5.3 |")[3]["llama"].error
    6.6e-16
    """
    version = re.search(r"with transformers (\S+) and", text).group(1)
    minutes = float(re.search(r"in (\d+) minutes", text).group(1))
    jobs = int(re.search(r"(\d+) families at a time", text).group(1))
    rows: dict[str, Result] = {}
    encoder = None
    for line in text.splitlines():
        if line.startswith("## "):
            encoder = {"## Decoders": False, "## Encoders": True}.get(line.strip())
        if encoder is None or not line.startswith("| ") or line.startswith("| family") or line.startswith("|---"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        model_type, class_name, status, error = cells[:4]
        rest = cells[4] if len(cells) == 6 else ""
        seconds = cells[-1]
        exported = not re.match(r"(config|model|export) failed|crashed|timed out", status)
        rows[model_type] = Result(Family(model_type, class_name, encoder), status, float(error) if error else None,
                                  float(seconds) if seconds else None, exported, float(rest) if rest else None)
    return version, minutes, jobs, rows


def previously_updated(text: str) -> list[str]:
    """The families an earlier ``--update`` re-ran (named in the report's header).

    >>> previously_updated("Rows of bart, llama re-run with")
    ['bart', 'llama']
    """
    found = re.search(r"Rows of (.+?) re-run with", text)
    return found.group(1).split(", ") if found else []


def render(results: list[Result], minutes: float, jobs: int, updated: list[str] | None = None) -> str:
    """``docs/coverage.md``: a header, the summary line, a table of decoders and one of encoders."""
    lines = [
        "# Coverage",
        "",
        f"<!-- Generated by `{COMMAND}` (tools/coverage.py); do not edit by hand. -->",
        f"Generated by `{COMMAND}` (`tools/coverage.py`) with transformers {transformers.__version__} and "
        f"torch {torch.__version__}, {jobs} families at a time, in {minutes:.0f} minutes: every text-only causal LM "
        f"and text encoder class, built tiny ({LAYERS} layers, random weights) from its config's defaults, compiled "
        "with `fxdepass.compile(model, dtype=torch.float64)` and attributed token by token (`readout=\"logits\"`, "
        f"encoders `\"hidden\"`). *exact*: the components sum to the real value within {EXACT:g} (relative) and "
        f"the real value matches the model's own float32 output within {SAME_REAL:g}. "
        "*rest share*: the share of the predicted token's attribution at the last position (encoders: every "
        f"feature) left in rest, `Σ|rest| / Σ|component|`; above {DEGENERATE:g} the family is *degenerate*: the "
        "tokens get almost nothing. "
        f"Not walked: the {len(skipped())} causal-LM and masked-LM model types that are multimodal, vision or "
        "audio models (listed below with their reasons); encoder-decoders are walked through their "
        "standalone decoder (`*ForCausalLM`).",
        "",
        summary(results),
    ]
    if updated:
        lines[4:4] = ["", f"Rows of {', '.join(updated)} re-run with `python tools/coverage.py --update --only "
                      "FAMILIES` (one or more runs); the others are from the last full walk (rest share blank "
                      "where that walk did not measure it)."]
    for title, encoder in (("Decoders", False), ("Encoders", True)):
        lines += ["", f"## {title}", "", "| family | class | status | max relative error | rest share | compile time (s) |",
                  "|---|---|---|---|---|---|"]
        for r in results:
            if r.family.encoder == encoder:
                error = "" if r.error is None else f"{r.error:.1e}"
                rest = "" if r.rest is None else f"{r.rest:.2f}"
                seconds = "" if r.seconds is None else f"{r.seconds:.1f}"
                lines.append(f"| {r.family.model_type} | {r.family.class_name} | {_cell(r.status)} | {error} | {rest} | {seconds} |")
    lines += ["", "## Not walked", "", "| model type | reason |", "|---|---|"]
    lines += [f"| {t} | {_cell(reason)} |" for t, reason in skipped().items()]
    return "\n".join(lines) + "\n"


def _merged(results: list[Result]) -> list[Result]:
    """Every walked family's row: re-run (``results``) or kept from docs/coverage.md."""
    version, _, _, rows = previous_rows(OUTPUT.read_text())
    if version != transformers.__version__:
        sys.exit(f"docs/coverage.md was walked with transformers {version}, this is {transformers.__version__}: "
                 "run the full walk (make coverage) instead of --update")
    rows.update({r.family.model_type: r for r in results})
    missing = [f.model_type for f in families() if f.model_type not in rows]
    if missing:
        sys.exit(f"docs/coverage.md has no row for {','.join(missing)}: add them to --only")
    return [rows[f.model_type] for f in families()]


def _updated(results: list[Result]) -> str:
    """docs/coverage.md with the rows of ``results`` replaced (or added); the header keeps the full walk's
    time and families at a time."""
    text = OUTPUT.read_text()
    _, minutes, jobs, _ = previous_rows(text)
    updated = list(dict.fromkeys([*previously_updated(text), *(r.family.model_type for r in results)]))
    return render(_merged(results), minutes, jobs, updated=updated)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types; prints the report instead of writing it")
    parser.add_argument("--update", action="store_true",
                        help="with --only: replace those families' rows in docs/coverage.md, keeping the others")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per family")
    options = parser.parse_args(argv)
    todo = families()
    if options.only:
        wanted = set(options.only.split(","))
        todo = [f for f in todo if f.model_type in wanted]
    start = time.monotonic()
    results = run(todo, options.jobs, options.timeout)
    report = render(results, (time.monotonic() - start) / 60, options.jobs)
    if options.only and options.update:
        OUTPUT.write_text(_updated(results))
        print(summary(_merged(results)))
    elif options.only:
        print(report)
    else:
        OUTPUT.parent.mkdir(exist_ok=True)
        OUTPUT.write_text(report)
        print(summary(results))


if __name__ == "__main__":
    main()
