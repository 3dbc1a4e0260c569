"""The error hierarchy: every failure fxdepass reports derives from :class:`FxDePassError`."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch.fx

__all__ = [
    "FxDePassError",
    "UnsupportedOpError",
    "CaptureError",
    "InvalidSeedError",
    "InvalidReadoutError",
    "InvalidInputError",
    "OutOfMemoryEstimateError",
    "ReconstructionError",
    "ModelNotFoundError",
    "OutputError",
    "node_location",
    "require",
]


class FxDePassError(Exception):
    """Base class of every error fxdepass raises on purpose."""


class UnsupportedOpError(FxDePassError):
    """An op that must carry components has no rule in the table."""


class CaptureError(FxDePassError):
    """``torch.export`` could not capture the model."""


class InvalidSeedError(FxDePassError):
    """A seed names a location the model does not have, or splits it wrongly."""


class InvalidReadoutError(FxDePassError):
    """A readout names a value the model does not compute, or one the seed cannot reach."""


class InvalidInputError(FxDePassError):
    """Inputs (ids, masks, targets, shapes, dtypes) that do not fit the model."""


class OutOfMemoryEstimateError(FxDePassError):
    """The decomposed pass would need more memory than the limit allows."""


class ReconstructionError(FxDePassError):
    """The components do not sum to the real value within the tolerance."""


class ModelChangedError(FxDePassError):
    """The model changed since :func:`fxdepass.compile` in a way the decomposed pass cannot follow (a tensor's
    shape, dtype or device; forward hooks added or removed, ``fxdepass.ablate``'s included)."""


class ModelNotFoundError(FxDePassError):
    """A model name, path or Hub id that does not lead to a loadable model (nothing is downloaded)."""


class OutputError(FxDePassError, OSError):
    """A file fxdepass will not write: one that exists (unless overwriting was asked for), a symbolic link, something
    that is not a regular file, or a place it cannot write to (:mod:`fxdepass.files`)."""


class MissingDependencyError(FxDePassError, ImportError):
    """An optional library (pandas, matplotlib) that a feature needs is not installed."""


def require(module: str, extra: str) -> Any:
    """Import the optional library ``module`` that a feature of the extra ``extra`` needs, or say how to install it.

    >>> require("matplotlib.pyplot", "plot")                                            # doctest: +SKIP
    <module 'matplotlib.pyplot' ...>
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"this needs {module}, which is not installed: pip install 'fxdepass[{extra}]' "
                                     f"(or pip install {module})") from None


def node_location(node: torch.fx.Node) -> str:
    """Describe where a graph node comes from: module path, module type and source line.

    >>> node_location(node)  # doctest: +SKIP
    "model.layers.0.mlp (LlamaMLP), modeling_llama.py:152: `return down_proj`"
    """
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, module_type = list(stack.values())[-1]
        where = f"{path or '<root>'} ({str(module_type).rsplit('.', 1)[-1]})"
    else:
        where = "<top level>"
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    if len(trace) >= 2:
        file_line, code = trace[-2].strip(), trace[-1].strip()
        where += f", {file_line}: `{code}`"
    return where
