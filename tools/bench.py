"""Benchmarks: DePass attribution against the batched forward of M copies of the prompt.

``make bench`` runs every configuration in its own process and writes docs/performance.md.  Times are
ratios measured in the same process (attribution / plain forward on a batch of M = N copies), never
absolute seconds from different runs.

    python tools/bench.py                 # the whole table → docs/performance.md
    python tools/bench.py --one llama small 64 tokens   # one configuration, prints a JSON line
    python tools/bench.py --one smollm2 real 64 tokens --read vocab   # every logit at the last position
    python tools/bench.py --only smollm2  # rerun one family, keep the other rows (docs/performance.json)
    python tools/bench.py --only compile  # rerun the compile section (cold and cached), keep every row
    python tools/bench.py --only slices   # rerun the neuron-slice width section, keep every row
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# every row's *compile s* is a cold compile (torch.export each time); the compile section measures the cache
os.environ.setdefault("FXDEPASS_NO_CACHE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8192
SIZES = {"small": dict(hidden=256, layers=4, heads=4, intermediate=1024, vocab=VOCAB),
         "medium": dict(hidden=768, layers=12, heads=12, intermediate=3072, vocab=VOCAB),
         # SmolLM2-135M-Instruct (fxdepass.load("smollm2")): 9 query heads share 3 key/value heads
         "real": dict(hidden=576, layers=30, heads=9, intermediate=1536, vocab=49152, kv_heads=3)}
LENGTHS = (16, 32, 64, 128, 256)
#: multiply-adds of the batched forward from which it is timed on N/SCALE copies and scaled (the medium
#: models and SmolLM2 at N ≥ 128: SmolLM2's 30 layers and 49k-token head cost more than its width says)
LARGE = 1e12
SCALE = 16
#: the memory target: peak ≤ BUDGET · U + weights, U = (M+1)·N·d·4 bytes
BUDGET = 2.5


#: what the attribution reads at the last position (or every position): keyword arguments of attribute()
READS = {"target": {}, "vocab": {"targets": "all"}, "full": {"targets": "all", "positions": "all"}}


def build(family: str, size: str) -> torch.nn.Module:
    if family == "smollm2":
        import fxdepass

        model = fxdepass.load("smollm2")[0].eval()
        assert next(model.parameters()).dtype == torch.float32
        return model
    s = SIZES[size]
    common = dict(vocab_size=VOCAB, num_hidden_layers=s["layers"], num_attention_heads=s["heads"], max_position_embeddings=1024)
    if family == "llama":
        config = transformers.LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], **common)
    elif family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                                         n_positions=1024, n_inner=s["intermediate"])
    elif family == "mixtral":
        config = transformers.MixtralConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"] // 4,
                                            num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=s["heads"],
                                            **common)
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def flop_floor(family: str, size: str, n: int, read: str = "target") -> float:
    """Multiply-adds of the decomposed pass over those of the batched forward, counting only matmuls:
    per component the value, output, gate and down projections (queries, keys and the up projection
    are frozen), causal zeros halving it, and the head at the read-out positions and rows only."""
    s = SIZES[size]
    d, i, layers, vocab = s["hidden"], s["intermediate"], s["layers"], s["vocab"]
    kv = d * s.get("kv_heads", s["heads"]) // s["heads"]  # width of the key and value projections
    forward = forward_macs(family, size, n)
    rows = {"target": 1, "vocab": vocab, "full": vocab * n}[read]
    decomposed = layers * (d * kv + d * d + 2 * d * i) * (n + 1) * (n + 1) / 2 + rows * d * (n + 1)
    return decomposed / forward


def forward_macs(family: str, size: str, n: int) -> float:
    """Matmul multiply-adds of the plain forward on a batch of N copies of an N-token prompt (queries,
    keys, values, output, MLP and head; attention's own products left out)."""
    s = SIZES[size]
    d, i, layers, vocab = s["hidden"], s["intermediate"], s["layers"], s["vocab"]
    kv = d * s.get("kv_heads", s["heads"]) // s["heads"]
    gated = family in ("llama", "mixtral", "smollm2")
    return (layers * (2 * d * d + 2 * d * kv + (3 if gated else 2) * d * i) + vocab * d) * n * n


def seed_for(kind: str, layers: int, hidden: int) -> object:
    import fxdepass

    if kind == "tokens":
        return fxdepass.tokens()
    if kind == "heads":
        return fxdepass.heads(layers // 2)
    if kind == "neurons":
        return fxdepass.neurons(layers // 2, group_size=16)
    basis = torch.randn(hidden, 8, generator=torch.Generator().manual_seed(0))
    projector = fxdepass.orthogonal_projector(basis)
    return fxdepass.subspace(layers // 2, [projector, torch.eye(hidden) - projector])


class RssSampler:
    """Samples this process's resident memory in a thread: the peak above the level at start."""

    def __init__(self) -> None:
        import threading

        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def allocator_peak(run: Callable[[], object]) -> int:
    """The most bytes torch's CPU allocator held at once during ``run()`` beyond what it held before
    (Note [Allocator peak])."""
    from torch.profiler import ProfilerActivity, profile

    # Python's cyclic garbage collector frees tensors held in reference cycles whenever it happens to run,
    # so with it on the same call peaked at 0.54, 0.93 or 1.08 MB (Mixtral, 2 layers, N=64); off, the peak
    # is the one the pass reaches when no collection comes to its rescue, the same every time.
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            run()
    finally:
        gc.enable()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(family: str, size: str, n: int, kind: str, repeats: int, read: str = "target") -> dict:
    import fxdepass

    torch.set_num_threads(2)
    load = os.getloadavg()[0]  # the machine's 1-minute load average, at the start and end of the row
    model = build(family, size)
    ids = torch.randint(0, SIZES[size]["vocab"], (1, n), generator=torch.Generator().manual_seed(n))
    start = time.perf_counter()
    decomposed = fxdepass.compile(model)
    compile_time = time.perf_counter() - start
    seed = seed_for(kind, SIZES[size]["layers"], SIZES[size]["hidden"])
    target = None
    with torch.no_grad():
        target = int(model(ids).logits[0, -1].argmax())
    options = READS[read] or {"targets": [target]}
    # warm-up on a short prompt: the module is built once for every length (dynamic sequence length)
    decomposed.attribute(ids[:, :min(n, 16)], seed=seed, **options)
    times = []
    with RssSampler() as memory:
        for _ in range(repeats):
            start = time.perf_counter()
            attribution = decomposed.attribute(ids, seed=seed, **options)
            times.append(time.perf_counter() - start)
    components = attribution.components.shape[0]
    # The forward's cost is linear in the batch: the largest are timed on a sixteenth of the copies (to
    # keep `make bench` within its time budget) and scaled by 16; the report marks them.
    copies = n // SCALE if forward_macs(family, size, n) >= LARGE else n
    batch = ids.expand(copies, n).contiguous()
    forwards = []
    with torch.no_grad():
        model(batch[:2])
        for _ in range(repeats):  # the median, as for the attribution: one slow or fast run does not set the ratio
            start = time.perf_counter()
            model(batch)
            forwards.append((time.perf_counter() - start) * n / copies)
    forward = statistics.median(forwards)
    # Note [Allocator peak]: every tensor's memory comes from c10's CPU allocator, which reports each
    # allocation and free (with its size) to the profiler when memory profiling is on.  Their running
    # sum in time order, maximised, is the peak of tensor memory the attribution held, as
    # torch.cuda.max_memory_allocated on a GPU: not the interpreter's own objects nor what glibc keeps
    # for reuse, which the RSS column counts.  Last, as profiling slows what runs after it.
    allocated = allocator_peak(lambda: decomposed.attribute(ids, seed=seed, **options))
    with torch.no_grad():  # the positions the attribution reads: the last, or every one
        alone = allocator_peak(lambda: model(ids, logits_to_keep=0 if read == "full" else 1))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "family": family, "size": size, "n": n, "seed": kind, "read": read, "components": components,
        "compile_s": compile_time, "attribute_s": statistics.median(times), "forward_s": forward,
        "ratio": statistics.median(times) / forward, "floor": flop_floor(family, size, n, read) if kind == "tokens" else None,
        "peak_rss": memory.peak - memory.base + weights, "allocated": allocated + weights, "forward_alone": alone + weights,
        "estimate": attribution.memory_estimate + weights,
        "process_rss": memory.peak, "weights": weights,
        "budget": BUDGET * unit(components, n, size) + alone + weights + result_bytes(components, n, size, read),
        "error": attribution.reconstruction_error(), "forward_scaled": copies != n,
        "load": [load, os.getloadavg()[0]],
    }


def run_variants(n: int = 64) -> list[dict]:
    """Precision and torch.compile variants on the small Llama: time and error against float64."""
    import fxdepass

    torch.set_num_threads(2)
    model = build("llama", "small")
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        target = int(model(ids).logits[0, -1].argmax())
    reference = fxdepass.compile(model, dtype=torch.float64).attribute(ids, targets=[target]).scores()
    rows = []
    for label, options in (("float32", {}), ("bfloat16", {"dtype": torch.bfloat16}), ("float16", {"dtype": torch.float16}),
                           ("float32 dense", {"causal_blocks": 0}),
                           ("float32 dense + torch.compile", {"causal_blocks": 0, "torch_compile": True})):
        start = time.perf_counter()
        decomposed = fxdepass.compile(model, **options)
        scores = decomposed.attribute(ids, targets=[target]).scores()  # includes torch.compile's own compile
        first = time.perf_counter() - start
        times = []
        for _ in range(3):
            start = time.perf_counter()
            scores = decomposed.attribute(ids, targets=[target]).scores()
            times.append(time.perf_counter() - start)
        error = float((scores.double() - reference).abs().max() / reference.abs().max())
        rows.append({"variant": label, "first_s": first, "attribute_s": statistics.median(times), "error": error})
    return rows


def compile_seconds(family: str) -> dict:
    """One process's compile of ``family`` (``fxdepass.compile``, float32, 2 threads), timed after the model loads."""
    import fxdepass

    torch.set_num_threads(2)
    model = build(family, "real")
    start = time.perf_counter()
    fxdepass.compile(model)
    return {"family": family, "compile_s": time.perf_counter() - start}


def run_compile_times(family: str = "smollm2", cached: int = 2) -> list[dict]:
    """Compile times of ``family`` in fresh processes sharing an empty capture cache (fxdepass/cache.py): the first
    process compiles cold (torch.export), the next ``cached`` reuse what it kept."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "FXDEPASS_NO_CACHE": "0", "FXDEPASS_CACHE": cache}  # "0": the cache on (fxdepass/cache.py)
        for kind in ["cold"] + ["cached"] * cached:
            done = subprocess.run([sys.executable, __file__, "--compile-one", family], env=env, capture_output=True,
                                  text=True, timeout=900, check=True)
            rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "kind": kind})
    return rows


#: neuron-slice widths (relative to the projection out's) the slice section compares in causal blocks, and its lengths
SLICE_WIDTHS = (0.5, 2.0, 3.0)
SLICE_LENGTHS = (16, 64, 128)


def run_slice_widths(repeats: int = 3) -> list[dict]:
    """SmolLM2's token attribution (last position, target row) in causal blocks with MLPs in neuron slices of each
    width in :data:`SLICE_WIDTHS` (``fxdepass.planning.BLOCKED_SLICE_WIDTH``), the widths alternating in one
    process: the median time, the allocator peak and the memory budget, per length in :data:`SLICE_LENGTHS`."""
    import fxdepass
    from fxdepass import planning

    torch.set_num_threads(2)
    model = build("smollm2", "real")
    decomposed = fxdepass.compile(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    chosen, rows = planning.BLOCKED_SLICE_WIDTH, []
    try:
        for n in SLICE_LENGTHS:
            ids = torch.randint(0, SIZES["real"]["vocab"], (1, n), generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                alone = allocator_peak(lambda: model(ids, logits_to_keep=1))
            times: dict[float, list[float]] = {w: [] for w in SLICE_WIDTHS}
            decomposed.attribute(ids)  # warm-up
            for _ in range(repeats):
                for width in SLICE_WIDTHS:
                    planning.BLOCKED_SLICE_WIDTH = width
                    start = time.perf_counter()
                    attribution = decomposed.attribute(ids)
                    times[width].append(time.perf_counter() - start)
            components = attribution.components.shape[0]
            budget = BUDGET * unit(components, n, "real") + alone + weights + result_bytes(components, n, "real", "target")
            for width in SLICE_WIDTHS:
                planning.BLOCKED_SLICE_WIDTH = width
                rows.append({"n": n, "width": width, "attribute_s": statistics.median(times[width]), "budget": budget,
                             "allocated": allocator_peak(lambda: decomposed.attribute(ids)) + weights,
                             "chosen": width == chosen})
    finally:
        planning.BLOCKED_SLICE_WIDTH = chosen
    return rows


#: the distributed row: token attribution of the small Llama at this length, in 1 and 2 gloo processes
DISTRIBUTED_N = 256


def _distributed_worker(rank: int, world: int, port: int, n: int, repeats: int, results: object) -> None:
    """One process of a distributed run (fxdepass/shards.py): the median time of ``attribute(..., distributed=True)``."""
    import torch.distributed as dist

    import fxdepass

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build("llama", "small")
        ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
        decomposed = fxdepass.compile(model)
        decomposed.attribute(ids[:, :16], distributed=True)  # warm-up: the module is built once for every length
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            attribution = decomposed.attribute(ids, distributed=True)
            times.append(time.perf_counter() - start)
        if rank == 0:
            results.put({"processes": world, "threads": 1, "attribute_s": statistics.median(times),
                         "scores": attribution.scores().tolist(), "error": attribution.reconstruction_error()})
    finally:
        dist.destroy_process_group()


def run_distributed(n: int = DISTRIBUTED_N, repeats: int = 3) -> list[dict]:
    """Token attribution of the small Llama at N = ``n``: one process (1 and 2 threads) against two gloo processes
    of one thread each; score difference = max |scores − one process's| / max |one process's|."""
    import socket

    import torch.multiprocessing as mp

    import fxdepass

    rows = []
    model = build("llama", "small")
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
    decomposed = fxdepass.compile(model)
    decomposed.attribute(ids[:, :16])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            attribution = decomposed.attribute(ids)
            times.append(time.perf_counter() - start)
        rows.append({"processes": 1, "threads": threads, "attribute_s": statistics.median(times),
                     "scores": attribution.scores().tolist(), "error": attribution.reconstruction_error()})
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_distributed_worker, args=(2, port, n, repeats, results), nprocs=2, join=True, start_method="spawn")
    rows.append(results.get())
    reference = torch.tensor(rows[0]["scores"])
    for row in rows:
        row["n"] = n
        row["score_difference"] = float((torch.tensor(row.pop("scores")) - reference).abs().max() / reference.abs().max())
    return rows


def configurations() -> list[tuple[str, str, int, str, int, str]]:
    """(family, size, N, seed, repeats, read) of every row of the report."""
    configs = []
    for family in ("llama", "gpt2", "mixtral"):
        for n in LENGTHS:
            configs.append((family, "small", n, "tokens", 3, "target"))
    for family in ("llama", "gpt2"):
        for n in LENGTHS:
            configs.append((family, "medium", n, "tokens", 3, "target"))
    for kind in ("heads", "neurons", "subspace"):
        for n in (32, 128):
            configs.append(("llama", "small", n, kind, 3, "target"))
    # the real model: the default read-out, the whole vocabulary at the last position, and every
    # logit at every position (small N only: (M+1)·N·49152 floats)
    configs += [("smollm2", "real", n, "tokens", 3, "target") for n in (16, 64, 128, 256)]
    configs += [("smollm2", "real", n, "tokens", 3, "vocab") for n in (64, 128)]
    configs += [("smollm2", "real", n, "tokens", 3, "full") for n in (16, 32)]
    configs += [("smollm2", "real", 64, kind, 3, "target") for kind in ("heads", "neurons")]
    return configs


def growth(rows: list[dict]) -> float | None:
    points = [(math.log(r["n"]), math.log(r["attribute_s"])) for r in rows if r["attribute_s"] > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def unit(components: int, n: int, size: str) -> int:
    """U = (M+1)·N·d·4 bytes: the attribution's components of the residual stream in float32."""
    return components * n * SIZES[size]["hidden"] * 4


def result_bytes(components: int, n: int, size: str, read: str) -> int:
    """What the attribution returns, in float32: (M+1) × the rows it reads (one target, the vocabulary, or
    the vocabulary at every position)."""
    vocab = SIZES[size]["vocab"]
    return components * {"target": 1, "vocab": vocab, "full": vocab * n}[read] * 4


def over_budget(rows: list[dict]) -> str:
    """The rows whose allocator peak is above the budget, the peak and the plain forward's in units of
    U = (M+1)·N·d·4 bytes above the weights (the budget allows 2.5 U)."""
    over = [r for r in rows if r["allocated"] > r["budget"]]
    if not over:
        return "Allocator peak above the budget: none."

    def units(r: dict, key: str) -> float:
        return (r[key] - r["weights"]) / unit(r["components"], r["n"], r["size"])

    listed = [f"{r['family']} {r['size']} {r['seed']} {r.get('read', 'target')} N={r['n']} ({r['allocated'] / r['budget']:.2f}×: "
              f"{units(r, 'allocated'):.2f} U, the plain forward alone {units(r, 'forward_alone'):.2f} U)" for r in over]
    return (f"Allocator peak above the budget, in U = (M+1)·N·d·4 bytes above the weights (the budget is {BUDGET} U "
            "+ the plain forward's own peak + the result): " + "; ".join(listed) + ".")


def load_line(rows: list[dict]) -> str:
    """The machine's load during the rows (other processes slow both sides of a ratio, not always alike)."""
    loads = [x for r in rows for x in r.get("load", ())]
    if not loads:
        return ""
    return (f" Load during the rows (1-minute load average at each row's start and end, {os.cpu_count()} cores): "
            f"{min(loads):.1f} to {max(loads):.1f}, median {statistics.median(loads):.1f}.")


#: what `--only` names besides a family's rows, as the report's first line says it
SECTIONS = {"compile": "The compile section", "slices": "The slice-width section"}


def report(rows: list[dict], failures: list[str], wall: float, variants: list[dict], only: str | None = None,
           distributed: list[dict] | None = None, compiles: list[dict] | None = None,
           slices: list[dict] | None = None) -> str:
    mb = 1 / 2**20
    lines = [
        "# Performance",
        "",
        "Generated by `make bench` (`python tools/bench.py`); do not edit by hand. "
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, float32, `OMP_WAIT_POLICY=PASSIVE`, "
        f"{torch.get_num_threads()} threads. "
        + (f"{SECTIONS.get(only, f'Rows of {only}')} rerun with `python tools/bench.py "
           f"--only {only}` ({wall / 60:.1f} min); the others are kept from the last whole run (docs/performance.json)."
           if only else f"Whole run: {wall / 60:.1f} min.")
        + load_line(rows),
        "",
        "Each configuration runs in its own process. *ratio* = attribution time (median of 3, token seed unless "
        "stated, read-out at the last position and target row, causal blocks) ÷ the plain forward of the model on a "
        "batch of M = N copies of the prompt (the median of 3 runs), measured in the same process. *floor* = the matmul multiply-add count "
        "of the decomposed pass over that of the batched forward (see `flop_floor`). *RSS MB* is the process's "
        "resident memory the attribution adds above the level before it (sampled every 2 ms) plus the weights; "
        "*allocator MB* the most bytes torch's CPU allocator held at once during one more attribution, from the "
        "profiler's memory events, plus the weights (Note [Allocator peak] in tools/bench.py): tensor memory, as "
        "`torch.cuda.max_memory_allocated` reports on a GPU; *forward(1) MB* the same for the plain model's forward "
        "of the prompt alone (batch 1), reading the last position's logits as the attribution does; *estimate MB* the "
        "memory guard's estimate of the attribution's peak, made before the pass (`Attribution.memory_estimate`), plus "
        f"the weights; *budget* = {BUDGET}·(M+1)·N·d·4 bytes + the plain forward's own peak (forward(1)) + the "
        "result itself ((M+1) × the rows read, float32), M+1 the attribution's components. *read*: `target` the "
        "default (the predicted token's logit at the last position), `vocab` every logit at the last position "
        "(`targets=\"all\"`), `full` every logit at every position (`targets=\"all\", positions=\"all\"`). † the batched forward timed on M/{SCALE} copies and scaled by {SCALE} (its "
        "cost is linear in the batch), to keep the run within 15 minutes.",
        "",
        "| model | size | seed | read | N | compile s | attribute s | forward(M) s | ratio | floor | RSS MB | allocator MB | forward(1) MB | estimate MB | budget MB | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor = f"{r['floor']:.2f}" if r["floor"] is not None else "—"
        lines.append(
            f"| {r['family']} | {r['size']} | {r['seed']} | {r['read']} | {r['n']} | {r['compile_s']:.1f} | {r['attribute_s']:.2f} | "
            f"{r['forward_s']:.2f}{'†' if r.get('forward_scaled') else ''} | {r['ratio']:.2f} | {floor} | {r['peak_rss'] * mb:.0f} | "
            f"{r['allocated'] * mb:.1f} | {r['forward_alone'] * mb:.1f} | {r['estimate'] * mb:.1f} | {r['budget'] * mb:.1f} | "
            f"{r['error']:.1e} |"
        )
    lines += ["", over_budget(rows)]
    lines += ["", "Growth of attribution time with N (least-squares slope of log time on log N):", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["size"], r["seed"], r["read"]), []).append(r)
    for (family, size, seed, read), group in groups.items():
        slope = growth(group)
        if slope is not None:
            lines.append(f"- {family} {size} {seed} {read}: N^{slope:.2f}")
    if variants:
        lines += ["", "Variants on the small Llama, N = 64 (token seed, last position, target row): score error = max "
                  "|scores − float64 scores| / max |float64 scores|; *first call* includes compile (and torch.compile's "
                  "own compilation).", "", "| variant | first call s | attribute s | score error |", "|---|---|---|---|"]
        lines += [f"| {v['variant']} | {v['first_s']:.1f} | {v['attribute_s']:.2f} | {v['error']:.1e} |" for v in variants]
    if compiles:
        cold = [c["compile_s"] for c in compiles if c["kind"] == "cold"]
        cached = [c["compile_s"] for c in compiles if c["kind"] == "cached"]
        lines += ["", f"Compile of SmolLM2-135M-Instruct (`fxdepass.compile(model)`, float32, after the model has loaded), "
                  "each in a fresh process, the processes sharing an empty capture cache (`$FXDEPASS_CACHE`, "
                  "fxdepass/cache.py): the first compiles cold (torch.export), the others reuse the captured graph it kept. "
                  "The rows' *compile s* above are cold compiles (`FXDEPASS_NO_CACHE=1`).", "",
                  "| compile | seconds |", "|---|---|",
                  f"| cold | {statistics.median(cold):.1f} |",
                  f"| cached (median of {len(cached)}) | {statistics.median(cached):.1f} |"]
    if slices:
        from fxdepass.blocked import slice_columns  # the runner's own count of a slice's neurons

        real = SIZES["real"]
        lines += ["", "Slice width: SmolLM2, token seed, last position, target row, causal blocks, MLPs in neuron slices of "
                  "*width* × the projection out's width (576), the widths alternating in one process "
                  "(`python tools/bench.py --only slices`); *chosen* is `fxdepass.planning.BLOCKED_SLICE_WIDTH`. "
                  "*attribute s* the median of 3; *allocator MB* and *budget MB* as in the rows above.", "",
                  "| N | width | slices | attribute s | allocator MB | budget MB | chosen |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['width']:g} | {-(-real['intermediate'] // slice_columns(real['intermediate'], real['hidden'], r['width']))} | {r['attribute_s']:.2f} | "
                  f"{r['allocated'] * mb:.1f} | {r['budget'] * mb:.1f} | {'yes' if r['chosen'] else ''} |" for r in slices]
    if distributed:
        one = distributed[0]["attribute_s"]
        lines += ["", f"Distributed (docs/distributed.md): the small Llama, token seed, N = {distributed[0]['n']}, "
                  "`attribute(..., distributed=True)` over gloo processes on this machine's CPU cores against one "
                  "process; *speed-up* = the one-process, one-thread time ÷ this row's; score difference = max "
                  "|scores − one process's| / max |one process's|.", "",
                  "| processes | threads each | attribute s | speed-up | score difference | error |", "|---|---|---|---|---|---|"]
        lines += [f"| {d['processes']} | {d['threads']} | {d['attribute_s']:.2f} | {one / d['attribute_s']:.2f} | "
                  f"{d['score_difference']:.1e} | {d['error']:.1e} |" for d in distributed]
    if failures:
        lines += ["", "Configurations that failed:", ""] + [f"- {f}" for f in failures]
    lines += ["", "## On a GPU", "", gpu_section()]
    return "\n".join(lines) + "\n"


#: the table `python tools/device_check.py --out docs/device-check.md` writes on a machine with a GPU
DEVICE_CHECK = ROOT / "docs" / "device-check.md"


def gpu_section() -> str:
    """The GPU table of tools/device_check.py (it names its machine), or a sentence saying it has not run."""
    if DEVICE_CHECK.is_file():
        return DEVICE_CHECK.read_text().strip()
    return ("`tools/device_check.py` has not run on a GPU yet (the session that wrote it had no GPU), "
            "so there are no GPU numbers. On a machine with one, `python tools/device_check.py --out docs/device-check.md` "
            "(under 8 minutes) writes its table — float64 exactness on CUDA, bfloat16 SmolLM2 against its float32 "
            "scores, token-level SmolLM2 at N = 512 and 1024 and a random-init 1.2 B-parameter Llama at N = 2048, "
            "each against the batched forward of M = N copies (time and `torch.cuda.max_memory_allocated`) — and "
            "`make bench` puts it here. Its CPU smoke run (`--device cpu --smoke`) is a test in `make test`.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=4, metavar=("FAMILY", "SIZE", "N", "SEED"))
    parser.add_argument("--read", choices=sorted(READS), default="target", help="with --one: what is read out")
    parser.add_argument("--only", metavar="FAMILY", help="rerun only this family's rows (e.g. smollm2) and keep the "
                        "others' from the last run's docs/performance.json")
    parser.add_argument("--variants", action="store_true", help="only the precision / torch.compile variants")
    parser.add_argument("--distributed", action="store_true", help=f"only the distributed row (1 vs 2 processes, "
                        f"N = {DISTRIBUTED_N})")
    parser.add_argument("--compile-times", action="store_true", help="only the compile section (cold and cached)")
    parser.add_argument("--compile-one", metavar="FAMILY", help=argparse.SUPPRESS)
    parser.add_argument("--slice-widths", action="store_true", help="only the neuron-slice width section")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    args = parser.parse_args()
    if args.one:
        family, size, n, kind = args.one
        print(json.dumps(run_one(family, size, int(n), kind, args.repeats, args.read)))
        return 0
    if args.variants:
        print(json.dumps(run_variants()))
        return 0
    if args.distributed:
        print(json.dumps(run_distributed(repeats=args.repeats)))
        return 0
    if args.compile_one:
        print(json.dumps(compile_seconds(args.compile_one)))
        return 0
    if args.compile_times:
        print(json.dumps(run_compile_times()))
        return 0
    if args.slice_widths:
        print(json.dumps(run_slice_widths(repeats=args.repeats)))
        return 0
    # the measured rows, beside the report, so that `--only` can rerun one family and keep the others
    raw = Path(args.out).with_suffix(".json")
    kept = json.loads(raw.read_text()) if args.only and raw.exists() else {"rows": [], "failures": [], "variants": []}
    kept.setdefault("distributed", [])
    rows = [r for r in kept["rows"] if r["family"] != args.only]
    failures = [f for f in kept["failures"] if not f.startswith(f"{args.only} ")]
    began = time.perf_counter()
    for family, size, n, kind, repeats, read in configurations():
        if args.only and family != args.only:
            continue
        command = [sys.executable, __file__, "--one", family, size, str(n), kind, "--repeats", str(repeats), "--read", read]
        name = f"{family} {size} {kind} {read} N={n}"
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if done.returncode == 0:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{name}: ratio {r['ratio']:.2f} ({r['attribute_s']:.2f}s / {r['forward_s']:.2f}s)", flush=True)
        else:
            reason = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
            failures.append(f"{name}: {reason}")
            print("FAILED", failures[-1], flush=True)
    def section_rows(flag: str) -> list[dict]:
        """A section's rows from its own process (``--variants``, ``--distributed``); a failure is listed."""
        done = subprocess.run([sys.executable, __file__, f"--{flag}"], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            failures.append(f"{flag}: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200])
            return []
        return json.loads(done.stdout.strip().splitlines()[-1])

    variants = kept["variants"] if args.only else section_rows("variants")
    distributed = kept["distributed"] if args.only else section_rows("distributed")
    compiles = kept.get("compiles", []) if args.only and args.only != "compile" else section_rows("compile-times")
    slices = kept.get("slices", []) if args.only and args.only != "slices" else section_rows("slice-widths")
    order = {config[:4] + config[5:]: i for i, config in enumerate(configurations())}
    rows.sort(key=lambda r: order.get((r["family"], r["size"], r["n"], r["seed"], r["read"]), len(order)))
    wall = time.perf_counter() - began
    Path(args.out).parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps({"rows": rows, "failures": failures, "variants": variants, "distributed": distributed,
                               "compiles": compiles, "slices": slices},
                              indent=1) + "\n")
    from graph_time import section  # tools/graph_time.py writes the graphs section; it is kept

    previous = Path(args.out).read_text() if Path(args.out).exists() else ""
    kept_graphs = section(previous)
    Path(args.out).write_text(report(rows, failures, wall, variants, only=args.only, distributed=distributed,
                                         compiles=compiles, slices=slices)
                              + ("\n" + kept_graphs if kept_graphs else ""))
    print(f"wrote {args.out} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
