"""The capture cache: a model's exported program kept across processes, so that compiling it again skips
``torch.export`` and functionalisation (nine tenths of a compile; Note [What the capture cache keeps]).

Entries live in ``$FXDEPASS_CACHE``, else ``$XDG_CACHE_HOME/fxdepass``, else ``~/.cache/fxdepass``; deleting
the directory, or any entry in it, is always safe.  ``FXDEPASS_NO_CACHE=1`` (or ``fxdepass.compile(...,
cache=False)``) turns the cache off.

>>> entry = Entry.of(model, kwargs, shapes)          # None when the model cannot be cached   # doctest: +SKIP
>>> program = entry.load(model) or export_again()                                              # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["Entry", "directory", "enabled"]

#: bump when what an entry holds, or how it is read, changes: older entries are then misses
FORMAT = 1

# Note [What the capture cache keeps]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# An entry is a folder named by the SHA-256 of its key, holding three files: ``program.json``, torch's own
# JSON serialisation of the functionalised ``ExportedProgram`` (``torch._export.serde.serialize`` with
# the state dict, constants and example inputs left out: those would be ``torch.save`` pickles),
# ``constants.safetensors``, the tensors the program made of its own (lifted constants), and ``key.json``,
# the key in full with the SHA-256 of the other two files.  Nothing is a pickle and nothing is unpickled.
# On a hit the program is rebuilt with the live model's parameters and buffers bound to it, exactly as a
# fresh export binds them (fxdepass/capture.py's ``_captured``), so weight values never come from the cache.
#
# The key is therefore what the exported graph depends on, not the weights' values: the versions of
# Python, torch, transformers and fxdepass; the model's class and its config (``to_json_string``); per
# module its path, class (with the size and mtime of the file defining it: edited modelling code misses)
# and its plain attributes (numbers, strings: a ``scaling`` set by hand misses); per parameter and
# buffer its name, shape, stride, dtype, device and which ones are the same tensor (tied weights);
# the full hash of any other tensor a module holds (such tensors can become constants of the graph); and
# the inputs' names, dtypes, devices and shape class (dynamic dimensions and their ranges, or the static
# shape).  Values of parameters and buffers are left out on purpose: the graph traced them as fake
# tensors, and the live ones are bound at every load, so an edited weight is a hit that computes with the
# edited weight.  What cannot be fingerprinted is not cached: forward hooks (traced into the graph, and
# code), a ``forward`` replaced on an instance, and custom script objects in the program.
#
# An entry whose files do not match their recorded hashes, whose key differs, or that fails to load for
# any reason is a miss: the model is exported afresh and the entry written again.


def enabled(requested: bool = True) -> bool:
    """Whether captures go through the cache: ``requested`` and ``FXDEPASS_NO_CACHE`` unset (or ``0``).

    >>> enabled(False)
    False
    """
    return requested and os.environ.get("FXDEPASS_NO_CACHE", "") in ("", "0")


def directory() -> Path:
    """Where entries live: ``$FXDEPASS_CACHE``, ``$XDG_CACHE_HOME/fxdepass`` or ``~/.cache/fxdepass``.

    >>> directory().name in ("fxdepass", os.path.basename(os.environ.get("FXDEPASS_CACHE", "")))
    True
    """
    if os.environ.get("FXDEPASS_CACHE"):
        return Path(os.environ["FXDEPASS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fxdepass"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One model's place in the cache: its key (Note [What the capture cache keeps]) and folder."""

    key: dict[str, Any]
    digest: str

    @classmethod
    def of(cls, model: torch.nn.Module, kwargs: dict[str, Any], shapes: dict[str, Any] | None) -> "Entry | None":
        """The entry for exporting ``model`` on ``kwargs`` with ``shapes`` (``torch.export``'s dynamic shapes),
        or ``None`` when the model holds what a key cannot describe (global hooks, a replaced ``forward``;
        the caller leaves out a model with forward hooks of its own)."""
        if _global_hooks() or any("forward" in vars(m) for m in model.modules()):
            return None
        key = {"format": FORMAT, "versions": _versions(), "model": _model_key(model), "inputs": _inputs_key(kwargs, shapes)}
        text = json.dumps(key, sort_keys=True)
        return cls(json.loads(text), hashlib.sha256(text.encode()).hexdigest())

    @property
    def folder(self) -> Path:
        return directory() / self.digest

    def load(self, model: torch.nn.Module) -> Any:
        """The cached program with ``model``'s tensors bound, or ``None`` (a miss: absent, stale or damaged)."""
        folder = self.folder
        if not (folder / "key.json").is_file():
            return None
        try:
            recorded = json.loads((folder / "key.json").read_text())
            program = (folder / "program.json").read_bytes()
            constants = (folder / "constants.safetensors").read_bytes()
            if (recorded.get("key") != self.key or recorded.get("program") != _sha(program)
                    or recorded.get("constants") != _sha(constants)):
                return None
            return _deserialize(program, constants, model)
        except Exception:  # a damaged entry of any kind is a miss, never an error
            return None

    def store(self, program: Any) -> None:
        """Write ``program`` as this entry, atomically (a folder renamed into place); failing quietly, as a
        cache that cannot be written is only a slower compile."""
        from safetensors.torch import save

        from torch.export.graph_signature import InputKind
        from torch._export.serde import serialize

        if any(s.kind == InputKind.CUSTOM_OBJ for s in program.graph_signature.input_specs):
            return
        lifted = {s.target for s in program.graph_signature.input_specs if s.kind == InputKind.CONSTANT_TENSOR}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                artifact = serialize.serialize(program, serialize_state_dict=False, serialize_constants=False,
                                               serialize_example_inputs=False)
            constants = save({name: program.constants[name].detach().cpu().contiguous() for name in sorted(lifted)})
            record = {"key": self.key, "program": _sha(artifact.exported_program), "constants": _sha(constants)}
            directory().mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{self.digest}.", dir=directory()))
            (staging / "program.json").write_bytes(artifact.exported_program)
            (staging / "constants.safetensors").write_bytes(constants)
            (staging / "key.json").write_text(json.dumps(record, sort_keys=True))
            if self.folder.exists():
                shutil.rmtree(self.folder, ignore_errors=True)
            try:
                os.replace(staging, self.folder)
            except OSError:  # another process wrote the same entry first
                shutil.rmtree(staging, ignore_errors=True)
        except Exception:
            return


def _deserialize(program: bytes, constants: bytes, model: torch.nn.Module) -> Any:
    """Rebuild an exported program from its JSON, binding ``model``'s parameters and buffers (and the
    stored lifted constants) where ``torch.export`` would hold its own copies: persistent ones in the
    state dict, non-persistent buffers among the constants, as ``torch.export`` keeps them."""
    from safetensors.torch import load

    import transformers.modeling_outputs  # noqa: F401  (registers model outputs with pytree, for the out spec)
    from torch._export.serde import schema, serialize

    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    held = {name: tensor.to(device) for name, tensor in load(constants).items()}
    state = dict(model.named_parameters(remove_duplicate=False))
    non_persistent = _non_persistent(model)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        (held if name in non_persistent else state)[name] = buffer
    log = logging.getLogger(serialize.__name__)
    level = log.level
    log.setLevel(logging.ERROR)  # it warns of range constraints on symbols the graph no longer uses
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            serialized = _schema_object(schema.ExportedProgram, json.loads(program))
            return serialize.ExportedProgramDeserializer().deserialize(serialized, state, held, None)
    finally:
        log.setLevel(level)


# Note [Reading the program's JSON]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# torch's own reader of the serialised program (``serialize._dict_to_dataclass``) resolves the type hints
# of a schema class again for every object it builds: some 50 000 times for a 30-layer model, a third of
# a cached compile.  :func:`_schema_object` builds the same objects from the same JSON by the same rules
# (optional fields, tagged unions, dataclasses, lists, dicts, floats spelled as strings), with each
# class's hints resolved once.  tests/test_cache.py checks a cached compile generates the same code and
# numbers as a fresh one.


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    from torch._export.serde import schema

    return typing.get_type_hints(cls, globalns=vars(schema))


def _schema_object(cls: Any, data: Any) -> Any:
    """The object of torch's export schema type ``cls`` that JSON ``data`` spells (Note [Reading the program's JSON])."""
    from torch._export.serde import schema
    from torch._export.serde.union import _Union

    if isinstance(cls, str):
        cls = getattr(schema, cls)
    elif isinstance(cls, typing.ForwardRef):
        cls = getattr(schema, cls.__forward_arg__)
    origin = typing.get_origin(cls)
    if origin is typing.Annotated:
        return _schema_object(cls.__origin__, data)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(cls):
        return None if data is None else _schema_object(typing.get_args(cls)[0], data)
    if isinstance(cls, type) and issubclass(cls, _Union):
        (tag, value), = data.items()
        return cls.create(**{tag: _schema_object(_hints(cls)[tag], value)})
    if dataclasses.is_dataclass(cls):
        hints = _hints(cls)
        return cls(**{f.name: _schema_object(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data})
    if isinstance(data, list):
        return [_schema_object(typing.get_args(cls)[0], d) for d in data] if data else data
    if isinstance(data, dict):
        value = typing.get_args(cls)[1]
        return {k: _schema_object(value, v) for k, v in data.items()}
    if cls is float:
        return float(data)
    return data


def _non_persistent(model: torch.nn.Module) -> set[str]:
    """The paths of ``model``'s non-persistent buffers (``torch.export`` keeps them among its constants)."""
    return {f"{path}.{name}" if path else name for path, module in model.named_modules()
            for name in module._non_persistent_buffers_set}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _global_hooks() -> bool:
    """Whether global module hooks (``torch.nn.modules.module.register_module_forward_hook``) are set."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def _versions() -> dict[str, str]:
    from . import __version__

    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = ""
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers_version,
            "fxdepass": __version__}


def _model_key(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    modules, tensors, others, seen = [], [], [], {}
    for path, module in model.named_modules(remove_duplicate=False):
        plain = {name: value for name, value in sorted(vars(module).items())
                 if name != "training" and not name.startswith("_") and _plain(value)}
        modules.append([path, _class_key(type(module)), repr(plain)])
        for name, value in sorted(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                others.append([f"{path}.{name}", _layout(value), _sha(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())])
    for kind, named in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            owner = seen.setdefault(id(tensor), name)
            tensors.append([kind, name, _layout(tensor), owner])
    return {"class": _class_key(type(model)), "config": config.to_json_string() if hasattr(config, "to_json_string") else None,
            "modules": modules, "tensors": tensors, "non_persistent": sorted(_non_persistent(model)), "other_tensors": others}


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain data a key can spell: numbers, strings, ``None`` and tuples or lists of them."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device))


def _class_key(cls: type) -> list[Any]:
    """A class's name and the size and modification time of the file defining it (edited code misses)."""
    try:
        stat = os.stat(inspect.getsourcefile(cls) or "")
        where = [stat.st_size, stat.st_mtime_ns]
    except (OSError, TypeError):
        where = None
    return [f"{cls.__module__}.{cls.__qualname__}", where]


def _layout(tensor: torch.Tensor) -> list[Any]:
    return [list(tensor.shape), list(tensor.stride()), str(tensor.dtype), str(tensor.device), tensor.requires_grad]


def _inputs_key(kwargs: dict[str, Any], shapes: dict[str, Any] | None) -> list[Any]:
    described = []
    for name, value in sorted(kwargs.items()):
        dims = (shapes or {}).get(name)
        if isinstance(value, torch.Tensor):
            shape = [repr(dims.get(axis)) if dims and axis in dims else size for axis, size in enumerate(value.shape)]
            described.append([name, shape, str(value.dtype), str(value.device)])
        else:
            described.append([name, repr(value)])
    return described
