"""The ``fxdepass`` command: attribute a prompt, build its attribution graph, inspect a model.

    fxdepass attribute demo --prompt "alice has red . bob has blue . what does bob have ?"
    fxdepass attribute MODEL_DIR --prompt TEXT --seed heads:-1 --out out --format html,json
    fxdepass attribute demo --prompts-file prompts.jsonl --out results.jsonl     (resumes when re-run)
    fxdepass graph demo --prompt TEXT --node-threshold 0.8 --out out
    fxdepass inspect demo

``MODEL`` is a name — ``smollm2`` (SmolLM2-135M-Instruct), ``demo`` (the bundled key-value recall model,
models/kv-recall) or ``minilm`` (all-MiniLM-L6-v2, an encoder: its mean-pooled sentence embedding is
attributed) — or a local Hugging Face directory, a ``.gguf`` file (or a directory holding one), or a Hub id
present in the local Hugging Face cache (see :mod:`fxdepass.models`; nothing is downloaded).
Exit codes: 0 success, 1 an fxdepass error (its message says what to do), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

__all__ = ["main"]

FORMATS = ("html", "dot", "graphml", "json")
SEED_KINDS = ("heads", "neurons", "modules")
BAR = 24


class UsageError(Exception):
    """A bad argument: the command exits with code 2 and this message."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, one line per step otherwise; silent when quiet.

    >>> Progress(quiet=True).step("compiling")
    """

    def __init__(self, quiet: bool, stream: Any = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()

    def step(self, message: str) -> None:
        if not self.quiet:
            print(f"fxdepass: {message}", file=self.stream, flush=True)

    def bar(self, done: int, total: int, label: str) -> None:
        if self.quiet:
            return
        filled = round(BAR * done / total) if total else BAR
        line = f"fxdepass: [{'#' * filled}{'.' * (BAR - filled)}] {done}/{total} {label}"
        if self.stream.isatty():
            end = "\n" if done == total else ""
            print(f"\r{line:<78}", end=end, file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)


# -- arguments ----------------------------------------------------------------------------------------------


def _parser() -> _Parser:
    parser = _Parser(prog="fxdepass", description="Exact DePass attribution for Hugging Face models.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sub: _Parser, prompt: bool = True, prompts_file: bool = False) -> None:
        sub.add_argument("model", metavar="MODEL", help="smollm2, demo, minilm, a local model directory, a .gguf file or a cached Hub id")
        sub.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                         help="precision of the real and decomposed passes (default float64: exact to 1e-9)")
        sub.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
        if not prompt:
            return
        sub.add_argument("--prompt", required=not prompts_file, help="the text to attribute")
        if prompts_file:
            sub.add_argument("--prompts-file", metavar="FILE", help="many prompts: JSON lines (a string, or "
                             '{"prompt": …, "target": …, "foil": …}) or a .txt file of lines; --out FILE.jsonl gets one '
                             "result line per prompt, appended, and a re-run resumes where the last one stopped")
            sub.add_argument("--batch-size", type=int, default=8, help="prompts per decomposed pass with --prompts-file "
                             "(default 8)")
        sub.add_argument("--target", help="target token (default: the predicted next token); encoders: none")
        sub.add_argument("--compare", metavar="TEXT", help="encoders: attribute the cosine similarity to TEXT's embedding")
        sub.add_argument("--out", metavar="DIR", help="write the results here (default ./fxdepass-out when --format is given)")
        sub.add_argument("--format", help=f"comma-separated output formats among {','.join(FORMATS)} (default: all, with --out)")
        sub.add_argument("--top", type=int, default=20, help="rows of the printed table (default 20)")
        sub.add_argument("--slug", help="the json format's name: DIR/SLUG.json, listed in DIR/graph-metadata.json for "
                         "circuit-tracer's viewer (default: from the prompt and target, so runs do not overwrite each other)")

    attribute = commands.add_parser("attribute", help="one decomposed pass: each component's share of the target")
    common(attribute, prompts_file=True)
    attribute.add_argument("--seed", default="tokens", help="tokens | heads:L | neurons:L | modules:L, heads:all | modules:all (default tokens)")
    graph = commands.add_parser("graph", help="the pruned attribution graph of tokens, heads and MLP blocks")
    common(graph)
    graph.add_argument("--node-threshold", type=float, default=0.8, help="cumulative influence kept (default 0.8)")
    graph.add_argument("--edge-threshold", type=float, default=0.98, help="cumulative edge weight kept (default 0.98)")
    inspect = commands.add_parser("inspect", help="list a model's locations and which rewrite rules fire")
    common(inspect, prompt=False)
    return parser


def _version() -> str:
    from . import __version__

    return f"fxdepass {__version__}"


def parse_seed(spec: str) -> Any:
    """``tokens``, ``heads:L``, ``neurons:L`` or ``modules:L`` as a seed.

    >>> parse_seed("heads:-1")
    Heads(layer=-1)
    """
    import fxdepass

    if spec == "tokens":
        return fxdepass.tokens()
    kind, _, layer = spec.partition(":")
    if kind in ("heads", "modules") and layer == "all":  # every layer's direct contributions
        return getattr(fxdepass, kind)("all")
    if kind not in SEED_KINDS or not layer.lstrip("-").isdigit():
        raise UsageError(f"--seed {spec!r}: use tokens, heads:L, neurons:L or modules:L with a layer number L, "
                         "or heads:all / modules:all")
    return getattr(fxdepass, kind)(int(layer))


def _formats(args: argparse.Namespace) -> tuple[Path | None, list[str]]:
    """(output directory, formats); no directory when neither --out nor --format is given."""
    if args.format is None and args.out is None:
        return None, []
    formats = list(FORMATS) if args.format is None else [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UsageError(f"--format {args.format!r}: choose among {','.join(FORMATS)}")
    return Path(args.out or "fxdepass-out"), formats


# -- loading ------------------------------------------------------------------------------------------------


def load(name: str, dtype: str, progress: Progress) -> tuple[Any, Any]:
    """(compiled model, tokenizer) for ``MODEL`` (:func:`fxdepass.models.resolve`); offline, the model in eval mode.
    Calls of :func:`main` in one process share compiled models (compiling takes seconds, attributing milliseconds)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import transformers

    from .errors import ModelNotFoundError
    from .models import resolve

    try:
        source = resolve(name)
    except ModelNotFoundError as error:
        raise UsageError(str(error)) from None
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if progress.quiet:
        transformers.utils.logging.disable_progress_bar()
    key = (source.describe(), dtype)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(source, dtype, progress)
    return _COMPILED[key]


#: compiled models by (model files, dtype), for repeated calls of :func:`main` in one process
_COMPILED: dict[tuple[str, str], tuple[Any, Any]] = {}


def _compile(source: Any, dtype: str, progress: Progress) -> tuple[Any, Any]:
    """Load the model of ``source`` (:func:`fxdepass.models.load`) and compile it."""
    import torch

    import fxdepass
    from .errors import ModelNotFoundError
    from .models import load_source

    progress.step(f"loading {source.describe()}")
    started = time.perf_counter()
    try:
        model, tokenizer = load_source(source)
    except ModelNotFoundError as error:
        raise UsageError(str(error)) from None
    progress.step(f"loaded in {time.perf_counter() - started:.1f} s; compiling {type(model).__name__} "
                  f"({sum(p.numel() for p in model.parameters()):,} parameters, {dtype})")
    started = time.perf_counter()
    decomposed = fxdepass.compile(model, tokenizer=tokenizer, dtype=getattr(torch, dtype))
    progress.step(f"compiled in {time.perf_counter() - started:.1f} s")
    return decomposed, tokenizer


def _encode(tokenizer: Any, text: str) -> Any:
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < 2:
        raise UsageError(f"--prompt {text!r} is {ids.shape[1]} token long; give at least two tokens")
    return ids


def _target(decomposed: Any, tokenizer: Any, args: argparse.Namespace, real: Any) -> Any:
    """The graph target: a token for causal models, the embedding (or its cosine with --compare) for encoders."""
    from .graph import resolve_target

    if decomposed.default_readout == "logits":
        if args.compare is not None:
            raise UsageError("--compare is for encoders; for a causal model use --target TOKEN")
        return resolve_target(decomposed, real, args.target)
    if args.target is not None:
        raise UsageError("--target is for causal models; an encoder's target is its embedding (or --compare TEXT)")
    other = None
    if args.compare is not None:
        other = decomposed.attribute(_encode(tokenizer, args.compare), positions="all", targets="all", readout="hidden").total[0].mean(0)
    return resolve_target(decomposed, real, other)


# -- output -------------------------------------------------------------------------------------------------


def _bar(score: float, largest: float) -> str:
    width = round(BAR * abs(score) / largest) if largest > 0 else 0
    return ("█" if score >= 0 else "░") * width


def _print_table(graph: Any, top: int, partition: bool) -> None:
    """The ``top`` nodes by |contribution|; ``partition``: the nodes split the target, so the folded rows' sum means something."""
    nodes = sorted((d for _, d in graph.nodes(data=True) if d["kind"] != "target"), key=lambda d: -abs(d["contribution"]))
    largest = max((abs(d["contribution"]) for d in nodes), default=0.0)
    print(f"  {'rank':>4}  {'component':<28} {'score':>10}")
    for rank, data in enumerate(nodes[:top], 1):
        print(f"  {rank:>4}  {data['label'][:28]:<28} {data['contribution']:>+10.4f}  {_bar(data['contribution'], largest)}")
    if len(nodes) > top:
        folded = f"{sum(d['contribution'] for d in nodes[top:]):>+10.4f}  (sum)" if partition else ""
        print(f"  {'…':>4}  {f'{len(nodes) - top} more':<28} {folded}".rstrip())


def _write(graph: Any, directory: Path, formats: list[str], stem: str, progress: Progress, slug: str | None) -> None:
    """Write ``graph`` as ``directory/stem.{format}`` for each format (the report also writes ``stem.dot``, and
    ``stem.svg`` when Graphviz is installed); json as ``directory/<slug>.json`` listed in ``graph-metadata.json``."""
    from .export import write_circuit_json, write_dot, write_graphml
    from .report import write_report

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = directory / f"{stem}.{fmt}"
        if fmt == "html":
            written.append(write_report(graph, path))
            written += [p for p in (path.with_suffix(".dot"), path.with_suffix(".svg")) if p.exists()]
        elif fmt == "dot":
            written.append(write_dot(graph, path))
        elif fmt == "graphml":
            written.append(write_graphml(graph, path))
        else:
            written.append(write_circuit_json(graph, directory, slug=slug))
            written.append(directory / "graph-metadata.json")
    for path in dict.fromkeys(written):
        progress.step(f"wrote {path}")


def _header(graph: Any) -> None:
    info = graph.graph
    print(f"prompt   {' '.join(info['prompt_tokens'])}")
    probability = f"   p = {info['probability']:.3f}" if info["readout"] == "logits" else ""
    print(f"target   {info['target']} = {info['value']:+.6f}{probability}")


# -- commands -----------------------------------------------------------------------------------------------


def _attribute(args: argparse.Namespace, progress: Progress) -> int:
    from .graph import layer_scores, seed_activations, seed_graph
    from .seeds import Tokens

    if args.prompts_file is not None:
        return _attribute_prompts(args, progress)
    if args.prompt is None:
        raise UsageError("give --prompt TEXT or --prompts-file FILE")
    directory, formats = _formats(args)
    seed = parse_seed(args.seed)
    decomposed, tokenizer = load(args.model, args.dtype, progress)
    ids = _encode(tokenizer, args.prompt)
    readout = decomposed.default_readout
    progress.step(f"attributing {ids.shape[1]} tokens ({args.seed})")
    names = [readout, "layers"] if isinstance(seed, Tokens) else [readout]
    results = decomposed.attribute(ids, positions="all", targets="all", seed=seed, readout=names)
    attribution = results[readout]
    target = _target(decomposed, tokenizer, args, attribution.total[0])
    heatmap = layer_scores(decomposed, ids, target, results["layers"].components) if isinstance(seed, Tokens) else None
    graph = seed_graph(attribution, seed, target, layers=decomposed.layers, tokenizer=tokenizer,
                       model_name=type(decomposed.model).__name__, activations=seed_activations(decomposed, ids, seed),
                       heatmap=heatmap)
    _header(graph)
    print(f"contributions of {args.seed} (rest {graph.graph['rest']:+.4f}):")
    _print_table(graph, args.top, partition=True)
    real = float(target.of(attribution.total[0]))
    print(f"components + rest {graph.graph['value']:+.6f}   real value {real:+.6f}   "
          f"reconstruction error {attribution.reconstruction_error():.1e}")
    if directory is not None:
        _write(graph, directory, formats, "attribution", progress, args.slug)
    return 0


def _attribute_prompts(args: argparse.Namespace, progress: Progress) -> int:
    """``attribute --prompts-file``: one JSON line per prompt appended to ``--out`` (fxdepass/dataset.py)."""
    from .dataset import read_prompts, write_results

    if args.prompt is not None or args.compare is not None or args.format is not None:
        given = "--prompt" if args.prompt is not None else "--compare" if args.compare is not None else "--format"
        raise UsageError(f"--prompts-file writes JSON lines to --out; leave out {given}")
    if args.out is None:
        raise UsageError("--prompts-file needs --out FILE.jsonl (results are appended there)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    entries = read_prompts(args.prompts_file)
    if args.target is not None:  # for the prompts that name no target of their own
        entries = [e if "target" in e else {**e, "target": args.target} for e in entries]
    seed = parse_seed(args.seed)
    decomposed, _ = load(args.model, args.dtype, progress)
    if decomposed.default_readout != "logits":
        raise UsageError(f"--prompts-file attributes a causal model's logits; {args.model} has none")
    progress.step(f"attributing {len(entries)} prompts from {args.prompts_file}, {args.batch_size} at a time")
    written, skipped = write_results(decomposed, entries, args.out, batch_size=args.batch_size, seed=seed,
                                     progress=False if progress.quiet else None)
    print(f"wrote {written} results to {args.out}" + (f" ({skipped} already there)" if skipped else ""))
    return 0


def _graph(args: argparse.Namespace, progress: Progress) -> int:
    from .graph import attribution_seconds, build_graph

    directory, formats = _formats(args)
    for name in ("node_threshold", "edge_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be a fraction in [0, 1], got {getattr(args, name)}")
    decomposed, tokenizer = load(args.model, args.dtype, progress)
    ids = _encode(tokenizer, args.prompt)
    real = decomposed.attribute(ids, positions="all", targets="all", readout=decomposed.default_readout).total[0]
    target = _target(decomposed, tokenizer, args, real)
    started = time.perf_counter()
    graph = build_graph(decomposed, ids, target, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
                        progress=progress.bar)
    built = time.perf_counter() - started
    one = attribution_seconds(decomposed, ids)
    _header(graph)
    info = graph.graph
    print(f"graph    {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges; explained fraction "
          f"{info['explained_fraction']:.3f}, influence kept {info['influence_fraction']:.3f}; built in {built:.1f} s "
          f"= {built / one:.1f} × one token-level attribution ({one:.2f} s) ({len(info['stages'])} stages)")
    print("stages   (kept edges into the target + pruned + rest = target value)")
    for stage in info["stages"]:
        print(f"  {stage['stage']:<20} kept {stage['kept']:>+10.4f}   pruned {stage['pruned']:>+10.4f}   "
              f"rest {stage['rest']:>+10.4f}")
    print("nodes by contribution (each stage on its own adds up to the target):")
    _print_table(graph, args.top, partition=False)
    if directory is not None:
        _write(graph, directory, formats, "graph", progress, args.slug)
    return 0


def _inspect(args: argparse.Namespace, progress: Progress) -> int:
    decomposed, _ = load(args.model, args.dtype, progress)
    model = decomposed.model
    config = model.config
    print(f"model    {type(model).__name__}: {decomposed.layers} layers, {config.num_attention_heads} heads, "
          f"hidden size {config.hidden_size}, default readout {decomposed.default_readout!r}")
    print("locations (module paths seeds and readouts can address):")
    for path in decomposed.locations():
        print(f"  {'  ' * path.count('.')}{path}")
    analysis = decomposed.graph_module.meta["fxdepass_analysis"]
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for node, info in analysis.info.items():
        if node in analysis.needed and info.rule is not None:
            counts[info.flavour, info.rule.name] += 1
        elif info.flavour == "frozen":      # used at its real value: attention probabilities, norm scales, …
            counts["frozen", str(node.target)] += 1
    print("rules that fire (token seed, default readout; frozen: values used as constants):")
    print(f"  {'count':>5}  {'flavour':<11} rule")
    for (flavour, rule), count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"  {count:>5}  {flavour:<11} {rule}")
    return 0


COMMANDS = {"attribute": _attribute, "graph": _graph, "inspect": _inspect}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    >>> main(["inspect", "demo", "--quiet"])                                          # doctest: +SKIP
    0
    """
    from .errors import FxDePassError

    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args, Progress(args.quiet))
    except UsageError as error:
        print(f"fxdepass: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit:  # --help and --version
        return int(exit.code or 0)
    except FxDePassError as error:
        print(f"fxdepass: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
