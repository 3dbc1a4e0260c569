"""The GPU check (issue 20): one script a machine with a GPU runs in under 8 minutes, writing a markdown table.

    python tools/device_check.py                          # on cuda; the table to stdout
    python tools/device_check.py --out device-check.md    # ... and to a file, headed by the machine's name
    python tools/device_check.py --device cpu --smoke     # every step at toy sizes (a test in `make test`)

Rows, in order:

- *float64 exactness*: tiny random Llama and Mixtral in float64 on the device, token and neuron seeds, every
  logit at every position: the reconstruction error (bound 1e-9) and the largest difference of the
  components from the same pass on the CPU (bound 1e-9, relative).
- *bfloat16*: SmolLM2 in bfloat16 against the same model in float32, the token scores of the predicted
  token: max |Δ score| / max |score|, within ``BF16_FACTOR`` times the bf16 forward's own deviation (the bound
  tests/test_device.py holds on the CPU).
- *tokens N=512, N=1024*: SmolLM2 (float32), token seed, the predicted token's logit at the last position.
- *llama-1b N=2048*: a random-init Llama of Llama-3.2-1B's shape (1.2 B parameters, bfloat16), the same.

For the performance rows: *attribute s* the median of 3 attributions after a warm-up; *forward(M) s* the
model's forward of a batch of M = N copies of the prompt, reading the last position's logits as the
attribution does (timed on M/k copies and scaled by k where M copies do not fit: marked †); *peak MB* the
allocator's peak during each (``torch.cuda.max_memory_allocated``; on the CPU the profiler's peak of the CPU
allocator, tools/bench.py), weights included (forward(M) † : of the M/k copies).  ``--smoke`` swaps in toy
models (a 2-layer Llama for SmolLM2 and for the 1B one) and short prompts, so that the CPU runs every step.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import fxdepass  # noqa: E402
from bench import allocator_peak  # noqa: E402

#: bf16 scores may differ from float32's by this many times the bf16 forward's own deviation (max |Δ logit| /
#: max |logit| at the last position): the attribution computes from the same rounded weights and values as
#: the forward, so it cannot be closer than that, and a score, a part of a logit, is smaller than the logit
#: its error is measured against.  Measured on SmolLM2 (CPU): "… Germany is" → " Berlin": score error 2.3e-2,
#: forward 1.6e-2 (1.4×); the README's key-value prompt → "\n": 0.12 against 0.023 (5.3×).
BF16_FACTOR = 8
EXACT_BOUND = 1e-9
#: Llama-3.2-1B's shape: 16 layers of width 2048, 32 query and 8 key/value heads, a 128k vocabulary
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096)
#: the toy stand-in of --smoke, for SmolLM2 and for the 1B Llama alike
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=512, max_position_embeddings=4096)
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def random_model(config: dict[str, Any], family: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random-init model of ``family`` ("llama" or "mixtral") made directly on ``device``, then cast to ``dtype``."""
    torch.manual_seed(seed)
    make = transformers.MixtralConfig if family == "mixtral" else transformers.LlamaConfig
    extra = dict(num_local_experts=4, num_experts_per_tok=2) if family == "mixtral" else {}
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(make(**config, **extra))
    return model.to(dtype).eval().requires_grad_(False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run: Callable[[], object], device: torch.device, repeats: int, weights: int) -> tuple[float, int]:
    """(median seconds of ``repeats`` calls, allocator peak bytes) of ``run()``, after a first call that warms up
    and measures the peak: ``torch.cuda.max_memory_allocated`` on a GPU (weights and all else held included),
    on the CPU the profiler's peak of the CPU allocator above what it held before (tools/bench.py) plus
    ``weights``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        held = torch.cuda.max_memory_allocated(device)
    else:
        held = allocator_peak(run) + weights
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), held


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def batched_forward(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, repeats: int) -> tuple[float, int, bool]:
    """(seconds, peak bytes, scaled) of the forward of M = N copies of ``ids``, the last position's logits read;
    halving the copies (and scaling the time) until they fit."""
    n = ids.shape[1]
    copies = n
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    while True:
        batch = ids.expand(copies, n).contiguous()
        try:
            with torch.no_grad():
                seconds, held = measure(lambda: model(batch, logits_to_keep=1), device, repeats, weights)
            return seconds * n / copies, held, copies != n
        except (RuntimeError, MemoryError) as error:
            if not out_of_memory(error) or copies == 1:
                raise
        del batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
        copies //= 2


def row(check: str, model: str, dtype: torch.dtype, n: int | str, result: str, bound: str, passed: bool | None,
        **timing: Any) -> dict[str, Any]:
    return {"check": check, "model": model, "dtype": str(dtype).removeprefix("torch."), "n": n, "result": result,
            "bound": bound, "ok": {True: "yes", False: "**no**", None: ""}[passed], **timing}


def exactness(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    """Float64 on the device: exact sums, and the same components as on the CPU."""
    rows = []
    config = dict(TOY, vocab_size=61, max_position_embeddings=64)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    for family in ("llama", "mixtral"):
        model = random_model(config, family, torch.device("cpu"), torch.float32)  # the pass cast to float64
        on_cpu = fxdepass.compile(model, dtype=torch.float64)
        here = on_cpu if device.type == "cpu" else fxdepass.compile(copy.deepcopy(model).to(device), dtype=torch.float64)
        for name, seed in (("tokens", fxdepass.tokens()), ("neurons", fxdepass.neurons(-1))):
            reference = on_cpu.attribute(ids, seed=seed, positions="all", targets="all")
            result = here.attribute(ids.to(device), seed=seed, positions="all", targets="all")
            error = result.reconstruction_error()
            difference = float((result.components.cpu() - reference.components).abs().max()
                               / reference.components.abs().max())
            against = "" if device.type == "cpu" else f", vs CPU {difference:.1e}"  # on the CPU: the same pass
            rows.append(row("float64 exactness", f"{family} tiny, {name}", torch.float64, ids.shape[1],
                            f"sum error {error:.1e}{against}", f"≤ {EXACT_BOUND:.0e}",
                            error <= EXACT_BOUND and difference <= EXACT_BOUND))
    return rows


def smollm2(device: torch.device, smoke: bool) -> tuple[torch.nn.Module, Any]:
    if smoke:
        return random_model(TOY, "llama", device, torch.float32, seed=1), None
    model, tokenizer = fxdepass.load("smollm2", device=device)
    return model.requires_grad_(False), tokenizer


def prompt_ids(tokenizer: Any, vocabulary: int, n: int, device: torch.device) -> torch.Tensor:
    """``n`` token ids: the prompt's, repeated (SmolLM2), or random ones (the toy models)."""
    if tokenizer is None:
        return torch.randint(0, vocabulary, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    return ids.repeat(n // len(ids) + 1)[:n].unsqueeze(0).to(device)


def bf16(model: torch.nn.Module, exact: fxdepass.DecomposedModel, device: torch.device, smoke: bool) -> dict[str, Any]:
    """bf16 against float32 on the device: the scores of the predicted token."""
    ids = prompt_ids(exact.tokenizer, model.config.vocab_size, 16 if smoke else 40, device)
    with torch.no_grad():
        target = [int(model(ids).logits[0, -1].argmax())]
    reference = exact.attribute(ids, targets=target).scores().double()
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    low = fxdepass.compile(model16, tokenizer=exact.tokenizer).attribute(ids, targets=target)
    error = float((low.scores().double() - reference).abs().max() / reference.abs().max())
    with torch.no_grad():
        real, rounded = model(ids).logits[0, -1].double(), model16(ids).logits[0, -1].double()
    deviation = float((rounded - real).abs().max() / real.abs().max())
    return row("bfloat16 vs float32 scores", "toy llama" if smoke else "SmolLM2-135M", torch.bfloat16, ids.shape[1],
               f"score error {error:.1e} (forward {deviation:.1e}), sum error {low.reconstruction_error():.1e}",
               f"score ≤ {BF16_FACTOR}× forward", error <= BF16_FACTOR * deviation
               and low.reconstruction_error() <= fxdepass.planning.TOLERANCE[torch.bfloat16])


def compiled(model: torch.nn.Module, tokenizer: Any) -> tuple[fxdepass.DecomposedModel, float]:
    """``model`` compiled (in its own dtype), and the seconds that took."""
    start = time.perf_counter()
    decomposed = fxdepass.compile(model, tokenizer=tokenizer)
    return decomposed, time.perf_counter() - start


def performance(model: torch.nn.Module, decomposed: fxdepass.DecomposedModel, compiled: float, name: str, n: int,
                device: torch.device, repeats: int = 3) -> dict[str, Any]:
    """Token-level attribution of the predicted token's logit against the batched forward of M = N copies."""
    dtype = next(model.parameters()).dtype
    ids = prompt_ids(decomposed.tokenizer, model.config.vocab_size, n, device)
    with torch.no_grad():
        target = [int(model(ids, logits_to_keep=1).logits[0, -1].argmax())]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    last: list[fxdepass.Attribution] = []

    def attribute() -> None:
        last[:] = [decomposed.attribute(ids, targets=target)]

    seconds, attributed = measure(attribute, device, repeats, weights)
    error, estimate = last[0].reconstruction_error(), last[0].memory_estimate
    last.clear()
    forward, forward_peak, scaled = batched_forward(model, ids, device, repeats)
    return row(f"tokens N={n}", name, dtype, n, f"sum error {error:.1e}", f"≤ {fxdepass.planning.TOLERANCE[dtype]:.0e}",
               error <= fxdepass.planning.TOLERANCE[dtype], compile_s=compiled, attribute_s=seconds,
               forward_s=forward, scaled=scaled, attribute_mb=attributed / 2**20, forward_mb=forward_peak / 2**20,
               estimate_mb=(estimate + weights) / 2**20)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        name = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{name}; torch {torch.__version__}, transformers {transformers.__version__}"


def table(rows: list[dict[str, Any]], device: torch.device, wall: float, smoke: bool) -> str:
    def number(value: Any, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    lines = [f"Device check (`python tools/device_check.py --device {device}{' --smoke' if smoke else ''}`) on "
             f"{machine(device)}; whole run {wall / 60:.1f} min.", "",
             "| check | model | dtype | N | result | bound | ok | compile s | attribute s | forward(M) s | ratio "
             "| attribute peak MB | forward(M) peak MB | estimate MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        forward = r.get("forward_s")
        mark = "†" if r.get("scaled") else ""
        ratio = r["attribute_s"] / forward if forward else None
        lines.append(f"| {r['check']} | {r['model']} | {r['dtype']} | {r['n']} | {r['result']} | {r['bound']} | {r['ok']} "
                     f"| {number(r.get('compile_s'), 1)} | {number(r.get('attribute_s'))} | {number(forward)}{mark} "
                     f"| {number(ratio)} | {number(r.get('attribute_mb'), 0)} | {number(r.get('forward_mb'), 0)}{mark} "
                     f"| {number(r.get('estimate_mb'), 0)} |")
    return "\n".join(lines) + "\n"


def guarded(check: str, step: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of ``step()``, or one failed row saying what went wrong: one step's failure does not lose the others'."""
    try:
        return step()
    except Exception as error:  # noqa: BLE001 — any failure is a result to report
        first = (str(error).strip().splitlines() or [""])[0][:160]
        return [row(check, "—", "—", "—", f"failed: {type(error).__name__}: {first}", "—", False)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="where to run (default cuda)")
    parser.add_argument("--smoke", action="store_true", help="toy models and short prompts: every step, in seconds")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device (try --device cpu --smoke)")
    started = time.perf_counter()
    rows = guarded("float64 exactness", lambda: exactness(device, args.smoke))
    model, tokenizer = smollm2(device, args.smoke)
    name = "toy llama" if args.smoke else "SmolLM2-135M"
    decomposed, seconds = compiled(model, tokenizer)
    rows += guarded("bfloat16 vs float32 scores", lambda: [bf16(model, decomposed, device, args.smoke)])
    for n in ((16, 32) if args.smoke else (512, 1024)):
        rows += guarded(f"tokens N={n}", lambda: [performance(model, decomposed, seconds, name, n, device)])
    del model, decomposed
    n = 64 if args.smoke else 2048

    def large() -> list[dict[str, Any]]:
        model = random_model(TOY if args.smoke else LLAMA_1B, "llama", device, torch.bfloat16, seed=2)
        count = sum(p.numel() for p in model.parameters())
        decomposed, seconds = compiled(model, None)
        label = "toy llama" if args.smoke else f"llama random {count / 1e9:.2f} B"
        return [performance(model, decomposed, seconds, label, n, device, repeats=1)]

    rows += guarded(f"tokens N={n}", large)
    text = table(rows, device, time.perf_counter() - started, args.smoke)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if all(r["ok"] != "**no**" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
