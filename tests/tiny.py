"""A tiny Llama with a word-level tokenizer, shared (compiled once per test run) by the graph, export, report and
command-line tests; and the bundled demo model when it exists."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers

import families
import fxdepass

DEMO = Path(__file__).resolve().parents[1] / "models" / "kv-recall"
DEMO_PROMPT = "alice has red . bob has blue . carol has green . what does bob have ?"
WORDS = [f"w{i}" for i in range(families.VOCAB)]
PROMPT = "w5 w17 w3 w42 w8 w23 w11"
IDS = torch.tensor([[5, 17, 3, 42, 8, 23, 11]])


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Whitespace-split words ``w0`` … ``w60``, ``w<n>`` being token ``n``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0")


def model() -> torch.nn.Module:
    """Two layers, no biases (the token stage then has an empty rest), eager attention, float64."""
    return families.build("llama", layers=2, bias=False, seed=4, attention="eager").double()


@functools.lru_cache(maxsize=1)
def compiled() -> tuple[torch.nn.Module, fxdepass.DecomposedModel]:
    built = model()
    return built, fxdepass.compile(built, dtype=torch.float64, tokenizer=tokenizer())


def save(directory: Path) -> Path:
    """The tiny model and its tokenizer as a Hugging Face directory."""
    model().save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory


def demo_exists() -> bool:
    return (DEMO / "config.json").is_file() and (DEMO / "tokenizer.json").is_file()
