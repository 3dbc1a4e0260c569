"""The ``fxdepass`` command: attribute a prompt, build its attribution graph, inspect a model.

    fxdepass attribute demo --prompt "alice has red . bob has blue . what does bob have ?"
    fxdepass attribute MODEL_DIR --prompt TEXT --seed heads:-1 --out out --format html,json
    fxdepass attribute demo --prompts-file prompts.jsonl --out results.jsonl     (resumes when re-run)
    fxdepass graph demo --prompt TEXT --node-threshold 0.8 --out out
    fxdepass inspect demo
    torchrun --nproc-per-node 2 -m fxdepass.cli attribute demo --prompt TEXT    (components over 2 processes)

``MODEL`` is a name — ``smollm2`` (SmolLM2-135M-Instruct), ``demo`` (the bundled key-value recall model,
models/kv-recall) or ``minilm`` (all-MiniLM-L6-v2, an encoder: its mean-pooled sentence embedding is
attributed) — or a local Hugging Face directory, a ``.gguf`` file (or a directory holding one), or a Hub id
present in the local Hugging Face cache (see :mod:`fxdepass.models`; nothing is downloaded, and no code that
came with a model runs).  Outputs never replace existing files without ``--force`` and are never written through
a symbolic link (:mod:`fxdepass.files`).  Exit codes (Note [Exit codes]): 0 success; 2 refused, with a one-line
message saying why (bad arguments, a model that cannot be loaded safely, an output in the way, any fxdepass
error); 1 an internal error (a bug; ``--debug`` shows the traceback); 130 interrupted.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn, Sequence

__all__ = ["main"]

FORMATS = ("html", "dot", "graphml", "json")
SEED_KINDS = ("heads", "neurons", "modules")
DTYPES = ("float32", "float64", "bfloat16", "float16")
#: dtypes the weights are loaded in (the model then runs as it would in a reduced-precision set-up)
REDUCED = ("bfloat16", "float16")
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
        sub.add_argument("--dtype", choices=DTYPES, default="float64",
                         help="precision of the real and decomposed passes (default float64: exact to 1e-9); "
                         "bfloat16 and float16 load the weights in that precision and keep the model's own casts")
        sub.add_argument("--device", default="cpu", help="where the model and the pass run: cpu, cuda, cuda:1, … "
                         "(default cpu)")
        sub.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
        sub.add_argument("--debug", action="store_true", help="on failure, print the Python traceback too")
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
        sub.add_argument("--force", action="store_true", help="replace output files that exist (without it they are "
                         "refused); a symbolic link in the way is refused either way")
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


def _formats(args: argparse.Namespace, stem: str) -> tuple[Path | None, list[str]]:
    """(output directory, formats); no directory when neither --out nor --format is given.  The outputs are
    checked here, before the model loads (a refusal then costs nothing), and again before they are written."""
    from .files import output_directory

    if args.format is None and args.out is None:
        return None, []
    formats = list(FORMATS) if args.format is None else [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UsageError(f"--format {args.format!r}: choose among {','.join(FORMATS)}")
    directory = output_directory(Path(args.out or "fxdepass-out"), create=False)
    _check_outputs(directory, formats, stem, args.slug, args.force)
    return directory, formats


# -- loading ------------------------------------------------------------------------------------------------


def load(name: str, dtype: str, progress: Progress, device: str = "cpu") -> tuple[Any, Any]:
    """(compiled model, tokenizer) for ``MODEL`` (:func:`fxdepass.models.resolve`); offline, the model in eval mode.
    Calls of :func:`main` in one process share compiled models (compiling takes seconds, attributing milliseconds)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import transformers

    from .models import resolve

    where = _device(device)
    source = resolve(name)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if progress.quiet:
        transformers.utils.logging.disable_progress_bar()
    key = (source.describe(), dtype, str(where))
    if key not in _COMPILED:
        _COMPILED[key] = _compile(source, dtype, progress, where)
    return _COMPILED[key]


#: compiled models by (model files, dtype, device), for repeated calls of :func:`main` in one process
_COMPILED: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def _device(spec: str) -> Any:
    """``--device`` as a ``torch.device`` present on this machine.

    >>> _device("cpu")
    device(type='cpu')
    """
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a device name (cpu, cuda, cuda:1, …)") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (callable(getattr(backend, "is_available", None)) and backend.is_available()):
        raise UsageError(f"--device {spec}: this machine has no {device.type} device that torch can use")
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise UsageError(f"--device {spec}: this machine has {count()} {device.type} device(s)")
    return device


def _compile(source: Any, dtype: str, progress: Progress, device: Any) -> tuple[Any, Any]:
    """Load the model of ``source`` (:func:`fxdepass.models.load`) and compile it."""
    import torch

    import fxdepass
    from .models import load_source

    progress.step(f"loading {source.describe()}")
    started = time.perf_counter()
    reduced = getattr(torch, dtype) if dtype in REDUCED else None
    model, tokenizer = load_source(source, dtype=reduced, device=device)
    progress.step(f"loaded in {time.perf_counter() - started:.1f} s; compiling {type(model).__name__} "
                  f"({sum(p.numel() for p in model.parameters()):,} parameters, {dtype}, {device})")
    started = time.perf_counter()
    # Reduced precision: components in the model's own dtype, its casts to float32 (norms) kept as they are.
    decomposed = fxdepass.compile(model, tokenizer=tokenizer, dtype=None if dtype in REDUCED else getattr(torch, dtype),
                                  progress=False if progress.quiet else None)
    progress.step(f"compiled in {time.perf_counter() - started:.1f} s")
    return decomposed, tokenizer


def _encode(decomposed: Any, text: str) -> Any:
    """``text``'s token ids on the model's device."""
    ids = decomposed.tokenizer(text, return_tensors="pt").input_ids.to(decomposed.device)
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
        other = decomposed.attribute(_encode(decomposed, args.compare), positions="all", targets="all", readout="hidden").total[0].mean(0)
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


def _check_outputs(directory: Path, formats: list[str], stem: str, slug: str | None, force: bool) -> None:
    """Refuse (:class:`~fxdepass.errors.OutputError`) when a file the formats write is in the way: an existing
    one without ``--force``, a link or a non-file at all (:mod:`fxdepass.files`).  The report writes ``stem.html``,
    ``stem.dot`` and ``stem.svg``; json writes ``<slug>.json`` (checked once the slug is known) and updates the
    listing ``graph-metadata.json`` in place."""
    from .export import METADATA_FILE, check_slug
    from .files import check_output
    from .report import report_paths

    for fmt in formats:
        if fmt == "html":
            paths = report_paths(directory / f"{stem}.html")
        elif fmt == "json":
            check_output(directory / METADATA_FILE, overwrite=True)
            paths = [directory / f"{check_slug(slug)}.json"] if slug else []
        else:
            paths = [directory / f"{stem}.{fmt}"]
        for path in paths:
            check_output(path, overwrite=force)


def _write(graph: Any, directory: Path, formats: list[str], stem: str, progress: Progress, slug: str | None,
           force: bool) -> None:
    """Write ``graph`` as ``directory/stem.{format}`` for each format (the report also writes ``stem.dot``, and
    ``stem.svg`` when Graphviz is installed); json as ``directory/<slug>.json`` listed in ``graph-metadata.json``.
    Every file is checked before the first is written, so a refusal leaves the folder as it was."""
    from .export import METADATA_FILE, default_slug, write_circuit_json, write_dot, write_graphml
    from .files import output_directory
    from .report import write_report

    slug = slug or default_slug(graph)
    _check_outputs(directory, formats, stem, slug, force)
    output_directory(directory)
    written = []
    for fmt in formats:
        path = directory / f"{stem}.{fmt}"
        if fmt == "html":
            written.append(write_report(graph, path, overwrite=force))
            written += [p for p in (path.with_suffix(".dot"), path.with_suffix(".svg")) if p.exists()]
        elif fmt == "dot":
            if "html" not in formats:                     # else the report writes this file
                written.append(write_dot(graph, path, overwrite=force))
        elif fmt == "graphml":
            written.append(write_graphml(graph, path, overwrite=force))
        else:
            written.append(write_circuit_json(graph, directory, slug=slug, overwrite=force))
            written.append(directory / METADATA_FILE)
    for path in dict.fromkeys(written):
        progress.step(f"wrote {path}")


def _header(graph: Any) -> None:
    info = graph.graph
    print(f"prompt   {' '.join(info['prompt_tokens'])}")
    probability = f"   p = {info['probability']:.3f}" if info["readout"] == "logits" else ""
    print(f"target   {info['target']} = {info['value']:+.6f}{probability}")


# -- commands -----------------------------------------------------------------------------------------------


def _join_torchrun(progress: Progress) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): join its process group and return True; the
    first process reports, the others are quiet (docs/distributed.md)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():  # gloo for CPU tensors, and NCCL for CUDA ones where there is a GPU
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_rank() != 0:
        progress.quiet = True
    return True


def _attribute(args: argparse.Namespace, progress: Progress) -> int:
    from .graph import layer_scores, seed_activations, seed_graph
    from .seeds import Tokens

    if args.prompts_file is not None:
        return _attribute_prompts(args, progress)
    if args.prompt is None:
        raise UsageError("give --prompt TEXT or --prompts-file FILE")
    directory, formats = _formats(args, "attribution")
    seed = parse_seed(args.seed)
    distributed = _join_torchrun(progress)
    decomposed, tokenizer = load(args.model, args.dtype, progress, args.device)
    ids = _encode(decomposed, args.prompt)
    readout = decomposed.default_readout
    progress.step(f"attributing {ids.shape[1]} tokens ({args.seed})" + (" across processes" if distributed else ""))
    names = [readout, "layers"] if isinstance(seed, Tokens) else [readout]
    results = decomposed.attribute(ids, positions="all", targets="all", seed=seed, readout=names, distributed=distributed)
    if results is None:  # a process other than the first: its share is with the first
        return 0
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
        _write(graph, directory, formats, "attribution", progress, args.slug, args.force)
    return 0


def _attribute_prompts(args: argparse.Namespace, progress: Progress) -> int:
    """``attribute --prompts-file``: one JSON line per prompt appended to ``--out`` (fxdepass/dataset.py)."""
    from .dataset import read_prompts, write_results
    from .files import check_output, output_directory

    if args.prompt is not None or args.compare is not None or args.format is not None:
        given = "--prompt" if args.prompt is not None else "--compare" if args.compare is not None else "--format"
        raise UsageError(f"--prompts-file writes JSON lines to --out; leave out {given}")
    if args.out is None:
        raise UsageError("--prompts-file needs --out FILE.jsonl (results are appended there)")
    if args.force:
        raise UsageError("--prompts-file appends to --out and a re-run resumes it, so there is nothing to --force; "
                         "remove the file to start over")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    output_directory(check_output(args.out, append=True).parent, create=False)
    entries = read_prompts(args.prompts_file)
    if args.target is not None:  # for the prompts that name no target of their own
        entries = [e if "target" in e else {**e, "target": args.target} for e in entries]
    seed = parse_seed(args.seed)
    decomposed, _ = load(args.model, args.dtype, progress, args.device)
    if decomposed.default_readout != "logits":
        raise UsageError(f"--prompts-file attributes a causal model's logits; {args.model} has none")
    progress.step(f"attributing {len(entries)} prompts from {args.prompts_file}, {args.batch_size} at a time")
    written, skipped = write_results(decomposed, entries, args.out, batch_size=args.batch_size, seed=seed,
                                     progress=False if progress.quiet else None)
    print(f"wrote {written} results to {args.out}" + (f" ({skipped} already there)" if skipped else ""))
    return 0


def _graph(args: argparse.Namespace, progress: Progress) -> int:
    from .graph import attribution_seconds, build_graph

    directory, formats = _formats(args, "graph")
    for name in ("node_threshold", "edge_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be a fraction in [0, 1], got {getattr(args, name)}")
    decomposed, tokenizer = load(args.model, args.dtype, progress, args.device)
    ids = _encode(decomposed, args.prompt)
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
        _write(graph, directory, formats, "graph", progress, args.slug, args.force)
    return 0


def _inspect(args: argparse.Namespace, progress: Progress) -> int:
    decomposed, _ = load(args.model, args.dtype, progress, args.device)
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

# Note [Exit codes]
# How a command ends is decided in one place, _failure, for whatever exception ended it:
#   0    success, and --help / --version.
#   2    refused: bad arguments (UsageError: argparse's and our own checks), and every FxDePassError, which
#        fxdepass raises on purpose about what it was given (a model it cannot load, or only by running code
#        that came with it; an output file that exists or is a link, OutputError; a seed, target or prompt that
#        does not fit the model).  The message is one line saying what and where, and no traceback: the
#        traceback is ours, not the user's to read.
#   1    an internal error: any other exception is a bug in fxdepass or below it.  One line says so, with the
#        exception; --debug prints its traceback.
#   130  interrupted (Ctrl-C), as a shell reports SIGINT.
# --debug prints the traceback of any failure before its line; the exit status stays the same.


def _failure(error: BaseException) -> tuple[int, str]:
    """(exit status, message) for the exception that ended a command (Note [Exit codes])."""
    from .errors import FxDePassError

    if isinstance(error, UsageError):
        return 2, f"error: {error}"
    if isinstance(error, FxDePassError):
        return 2, f"error: {type(error).__name__}: {error}"
    if isinstance(error, KeyboardInterrupt):
        return 130, "interrupted"
    return 1, (f"internal error: {type(error).__name__}: {error} (a bug in fxdepass: re-run with --debug for the "
               "traceback, and please report it)")


def _one_line(text: str) -> str:
    """``text`` on one line (a message may quote a prompt or a file's error that holds line breaks)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (Note [Exit codes]).

    >>> main(["inspect", "demo", "--quiet"])                                          # doctest: +SKIP
    0
    """
    debug = False
    try:
        args = _parser().parse_args(argv)
        debug = args.debug
        return COMMANDS[args.command](args, Progress(args.quiet))
    except SystemExit as exit:  # --help and --version
        return int(exit.code or 0)
    except (Exception, KeyboardInterrupt) as error:
        code, message = _failure(error)
        if debug:
            traceback.print_exc()
        print(f"fxdepass: {_one_line(message)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
