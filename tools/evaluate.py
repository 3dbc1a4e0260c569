"""`make evaluate`: is DePass faithful?  Token removal and component masking against standard baselines.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/evaluate.py                           # docs/faithfulness.*
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/evaluate.py --tasks ioi --prompts 20  # a quick look, printed

For each task of :data:`TASKS` — a tiny Llama trained by ``tools/train_tiny.py`` (trained first when
``models/<task>`` is missing) and held-out prompts whose decisive token is known — runs the harness of
``fxdepass.evaluate`` and writes ``docs/faithfulness.md`` (tables, targets, wall times) and
``docs/faithfulness.png`` (the token-removal curves).  Needs captum and matplotlib.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
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
PROMPTS = 200
#: the DePass variant the targets are checked for: the paper's rule (softmax allocation, sink option on)
DEPASS = "DePass softmax"


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: its model in ``models/<name>``, its prompts module in ``tools/``, the key of
    ``Example.positions`` holding the decisive position, and the ``train_tiny.py`` arguments that train it."""

    name: str
    module: str
    decisive: str
    training: tuple[str, ...]

    @property
    def directory(self) -> Path:
        return ROOT / "models" / self.name


TASKS = (
    Task("kv-recall", "tasks", "value", ()),
    # More heads than the others, so that small percentages of heads are distinct sets.
    Task("ioi", "ioi", "io", ("--task", "ioi", "--layers", "3", "--heads", "8", "--kv-heads", "4")),
    Task("induction", "induction", "next", ("--task", "induction")),
)


@dataclasses.dataclass
class TaskResult:
    """Everything the report says about one task."""

    task: Task
    model: Any
    prompts: int
    mean_length: float
    answered: int
    tokens: dict[str, evaluate.TokenResult]
    components: dict[str, dict[str, evaluate.ComponentResult]]
    seconds: dict[str, float]


def ensure_model(task: Task) -> None:
    """Train the task's model with ``tools/train_tiny.py`` when ``models/<task>`` lacks it."""
    if (task.directory / "model.safetensors").exists() and (task.directory / "tokenizer.json").exists():
        return
    print(f"models/{task.name} is missing: training it with tools/train_tiny.py {' '.join(task.training)}", flush=True)
    import train_tiny
    train_tiny.main(list(task.training))


def load_prompts(task: Task, tokenizer: Any, count: int) -> list[evaluate.Prompt]:
    """The task's first ``count`` held-out prompts, tokenized, with their decisive position."""
    module = importlib.import_module(task.module)
    return [evaluate.Prompt(tokenizer(e.prompt, return_tensors="pt").input_ids[0],
                            tokenizer.convert_tokens_to_ids(e.answer), (e.positions[task.decisive],))
            for e in module.make_prompts(count, module.HELD_OUT_SEED)]


def run_task(task: Task, count: int) -> TaskResult:
    """Train the model if needed, then evaluate every token-level and component-level method."""
    ensure_model(task)
    tokenizer = transformers.AutoTokenizer.from_pretrained(task.directory)
    # Eager attention: the attention baselines need the probabilities.
    model = transformers.AutoModelForCausalLM.from_pretrained(task.directory, attn_implementation="eager").eval()
    prompts = load_prompts(task, tokenizer, count)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    decomposed = {a: fxdepass.compile(model, activation=a, dtype=torch.float64) for a in evaluate.ACTIVATIONS}
    seconds["compile"] = time.perf_counter() - started
    started = time.perf_counter()
    tokens = evaluate.evaluate_tokens(model, prompts, evaluate.token_methods(model, decomposed))
    seconds["tokens"] = time.perf_counter() - started
    started = time.perf_counter()
    answered = evaluate.answered(model, prompts)
    components = evaluate.evaluate_components(model, answered, evaluate.component_methods(model, decomposed["softmax"]))
    seconds["components"] = time.perf_counter() - started
    seconds["total"] = sum(seconds.values())
    length = sum(len(p.ids) for p in prompts) / len(prompts)
    return TaskResult(task, model, len(prompts), length, len(answered), tokens, components, seconds)


# -- the report ---------------------------------------------------------------------------------


def _baselines(results: dict[str, Any]) -> dict[str, Any]:
    return {name: r for name, r in results.items() if not name.startswith("DePass")}


def targets(results: list[TaskResult]) -> list[tuple[str, str, bool, str]]:
    """The issue's targets, checked: ``(target, task, holds, evidence)`` rows."""
    rows = []
    for r in results:
        depass, others = r.tokens[DEPASS], _baselines(r.tokens)
        best = max(others, key=lambda n: others[n].comprehensiveness)
        rows.append((f"{DEPASS} comprehensiveness ≥ every baseline's", r.task.name,
                     depass.comprehensiveness >= others[best].comprehensiveness,
                     f"{depass.comprehensiveness:.2f} vs best baseline {others[best].comprehensiveness:.2f} ({best})"))
        best = min(others, key=lambda n: others[n].sufficiency)
        rows.append((f"{DEPASS} sufficiency ≤ every baseline's", r.task.name,
                     depass.sufficiency <= others[best].sufficiency,
                     f"{depass.sufficiency:.2f} vs best baseline {others[best].sufficiency:.2f} ({best})"))
        if r.task.name == "kv-recall":
            rows.append((f"{DEPASS} top-1 hit rate ≥ 0.9", r.task.name, depass.top1 >= 0.9, f"{depass.top1:.3f}"))
        if r.task.name == "ioi":
            heads = r.components["heads"]
            others = _baselines(heads)
            best = min(others, key=lambda n: others[n].most[5])
            rows.append(("masking DePass's top 5% heads drops accuracy more than any baseline's", r.task.name,
                         heads["DePass"].most[5] < others[best].most[5],
                         f"accuracy {heads['DePass'].most[5]:.3f} vs best baseline "
                         f"{others[best].most[5]:.3f} ({best})"))
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _model_line(r: TaskResult) -> str:
    config = r.model.config
    parameters = sum(p.numel() for p in r.model.parameters())
    command = " ".join(("tools/train_tiny.py",) + r.task.training)
    return (f"`models/{r.task.name}` (`{command}`; see its TRAINING.md): "
            f"{type(r.model).__name__}, {parameters:,} parameters, {config.num_hidden_layers} layers × "
            f"{config.num_attention_heads} heads, {config.intermediate_size} MLP neurons per layer")


def token_table(r: TaskResult) -> str:
    rows = [[name, f"{t.comprehensiveness:.1f}", f"{t.sufficiency:.1f}", f"{t.aopc_comprehensiveness:.3f}",
             f"{t.aopc_sufficiency:.3f}", f"{t.top1:.3f}", f"{t.top3:.3f}", f"{t.seconds:.1f}"]
            for name, t in r.tokens.items()]
    return _table(["method", "comprehensiveness ↑", "sufficiency ↓", "AOPC comp. ↑", "AOPC suff. ↓",
                   "top-1 hit ↑", "top-3 hit ↑", "time (s)"], rows)


def curve_table(r: TaskResult) -> str:
    percents = next(iter(r.tokens.values())).percents
    rows = [[name] + [f"{c:.0f} / {s:.0f}" for c, s in zip(t.comprehensiveness_curve, t.sufficiency_curve)]
            for name, t in r.tokens.items()]
    return _table(["method"] + [f"k={k}%" for k in percents], rows)


def masking_table(results: dict[str, evaluate.ComponentResult]) -> str:
    first = next(iter(results.values()))
    percents = list(first.most)
    header = (["method"] + [f"most {p}% ({first.counts[p]}) ↓" for p in percents]
              + [f"least {p}% ({first.counts[p]}) ↑" for p in percents] + ["time (s)"])
    rows = [[name] + [f"{c.most[p]:.3f}" for p in percents] + [f"{c.least[p]:.3f}" for p in percents]
            + [f"{c.seconds:.1f}"] for name, c in results.items()]
    return _table(header, rows)


def report(results: list[TaskResult], plot: str, threads: int) -> str:
    """The markdown of ``docs/faithfulness.md``."""
    import captum

    versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, captum {captum.__version__}, "
                f"{threads} thread(s)")
    checks = targets(results)
    parts = [
        "# Faithfulness",
        "",
        f"<!-- Generated by `{COMMAND}` (tools/evaluate.py); do not edit by hand. -->",
        f"Generated by `{COMMAND}` (`OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/evaluate.py`) with {versions}. "
        "Regenerate it with that command; it trains a task's model first when `models/<task>` is missing.",
        "",
        "## Targets",
        "",
        f"Checked for `{DEPASS}` (softmax allocation, sink-token option on: the paper's rule) against every "
        "non-DePass method; the other DePass variants are in the tables.",
        "",
        _table(["target", "task", "holds", "measured"],
               [[t, task, "yes" if holds else "**no**", evidence] for t, task, holds, evidence in checks]),
        "",
        f"{sum(c[2] for c in checks)} of {len(checks)} hold.",
        "",
        "## How it is measured",
        "",
        METHOD_TEXT,
        "",
        f"![token-removal curves]({plot})",
        "",
    ]
    for r in results:
        parts += [
            f"## {r.task.name}",
            "",
            _model_line(r) + ".",
            "",
            f"{r.prompts} held-out prompts (`tools/{r.task.module}.py`, `make_prompts({r.prompts}, HELD_OUT_SEED)`), "
            f"{r.mean_length:.1f} tokens on average; decisive token: `positions[{r.task.decisive!r}]`. "
            f"The model answers {r.answered} of them correctly (the masking study uses those).",
            "",
            f"Wall time: {r.seconds['total']:.0f} s in all — compiling the three DePass variants "
            f"{r.seconds['compile']:.0f} s, token level {r.seconds['tokens']:.0f} s, component level "
            f"{r.seconds['components']:.0f} s; *time* columns are each method's own share (computing its scores).",
            "",
            "### Tokens",
            "",
            token_table(r),
            "",
            "Removal curves, comprehensiveness / sufficiency at each k:",
            "",
            curve_table(r),
            "",
        ]
        for kind in ("heads", "neurons"):
            parts += [f"### {kind.capitalize()}: accuracy after masking", "", masking_table(r.components[kind]), ""]
    return "\n".join(parts)


METHOD_TEXT = """\
**Token level.** Every method scores each token of a prompt (higher: more important); the first and
last tokens are not eligible.  For k = 10, 20, …, 100% of the eligible tokens (rounded up),
`patch_top` deletes the top-k tokens from the prompt (comprehensiveness, higher is better) and
`recover_top` keeps only them plus the first and last tokens (sufficiency, lower is better).  Each is
scored `min(100, |p_clean − p_after| / p_clean × 100)`, p the probability of the expected answer at the
last position, and averaged over k and prompts.  The AOPC columns average the signed drop
`p_clean − p_after` (probability, not percent) over the same k.  The top-1 / top-3 hit rates count
prompts whose decisive token is ranked first / among the first three eligible tokens.  At k = 100%
every method deletes (or keeps) the same tokens.

Methods: DePass token contributions to the answer's logit (`fxdepass.compile(model, activation=…,
dtype=torch.float64)`, `fxdepass.tokens(sink=…)`); integrated gradients (captum, 50 steps,
zero-embedding baseline) and input×gradient on the answer's log-probability, summed over embedding
dimensions; the gradient's L2 norm per token; the last position's attention to each token in the last
layer (mean over heads) and over all layers and heads; attention rollout (½·attention + ½·I per layer,
renormalised, multiplied across layers); uniform random scores.  Signed scores are ranked as they are:
a token that lowers the answer counts as unimportant.

**Component level.** On the prompts the model answers correctly, each prompt's top-p% heads or
neurons over all layers (p of all heads / all neurons, rounded up; the count is in the column header)
are zeroed with `fxdepass.ablate` — a head's columns of the attention output projection's input, a
neuron's column of the MLP down projection's input — and the accuracy (argmax over the vocabulary =
answer) is measured: lower is better for the most important, higher for the mirror experiment that
zeroes the least important (the bottom of the same ranking).  Methods: DePass head / neuron
contributions to the answer's logit (`fxdepass.heads(layer)`, `fxdepass.neurons(layer)`, softmax
allocation); attribution patching, |Σ activation × gradient| of the answer's log-probability over
positions and the component's features (the first-order estimate of zeroing it); the activation's L2
norm over positions; that norm times the norm of the component's weight columns in the projection;
random.

DePass freezes attention probabilities, so it credits a token only for what flows from it through
values and MLPs: a token that matters only by steering attention (as queries and keys do) gets no
credit, while gradient methods see that effect.  Deleting tokens makes prompts the models never saw;
all methods are measured on the same deletions."""


def plot_curves(results: list[TaskResult], path: Path) -> None:
    """Comprehensiveness and sufficiency against k for every method, one row per task."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(len(results), 2, figsize=(11, 3.2 * len(results) + 1.2), squeeze=False)
    colours = matplotlib.colormaps["tab20"]
    for row, r in zip(axes, results):
        for index, (name, t) in enumerate(r.tokens.items()):
            style = {"color": colours(index), "linewidth": 2.0 if name.startswith("DePass") else 1.2,
                     "linestyle": "-" if name.startswith("DePass") else ":" if name == "random" else "--"}
            row[0].plot(t.percents, t.comprehensiveness_curve, label=name, **style)
            row[1].plot(t.percents, t.sufficiency_curve, label=name, **style)
        for axis, title in zip(row, ("comprehensiveness (patch_top) ↑", "sufficiency (recover_top) ↓")):
            axis.set_title(f"{r.task.name}: {title}", fontsize=10)
            axis.set_xlabel("k (% of eligible tokens)")
            axis.set_ylim(0, 102)
            axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.9 / (3.2 * len(results) + 1.2), 1, 1))
    figure.savefig(path, dpi=110, metadata={"Software": None})
    pyplot.close(figure)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(t.name for t in TASKS),
                        help="comma-separated task names (not all of them: the report is printed, docs untouched)")
    parser.add_argument("--prompts", type=int, default=PROMPTS,
                        help=f"prompts per task (not {PROMPTS}: the report is printed, docs untouched)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    names = args.tasks.split(",")
    unknown = set(names) - {t.name for t in TASKS}
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}; choose from {[t.name for t in TASKS]}")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    results = []
    for task in (t for t in TASKS if t.name in names):
        results.append(run_task(task, args.prompts))
        print(f"{task.name}: {results[-1].seconds['total']:.0f} s", flush=True)
    complete = len(results) == len(TASKS) and args.prompts == PROMPTS
    plot = DOCS / "faithfulness.png" if complete else ROOT / "out" / "faithfulness.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(results, plot)
    text = report(results, plot.name if complete else str(plot), args.threads)
    if complete:
        (DOCS / "faithfulness.md").write_text(text + "\n")
        print(f"wrote docs/faithfulness.md and docs/{plot.name}")
    else:
        print(text)


if __name__ == "__main__":
    main()
