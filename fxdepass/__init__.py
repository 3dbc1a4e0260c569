"""fxdepass: exact DePass attribution for any Hugging Face transformer.

>>> import fxdepass
>>> decomposed = fxdepass.compile(model, dtype=torch.float64)        # doctest: +SKIP
>>> attribution = decomposed.attribute(input_ids)                    # doctest: +SKIP
>>> attribution.scores()        # each input token's contribution to the predicted logit
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    CaptureError,
    FxDePassError,
    InvalidInputError,
    InvalidReadoutError,
    InvalidSeedError,
    MissingDependencyError,
    ModelChangedError,
    ModelNotFoundError,
    OutOfMemoryEstimateError,
    ReconstructionError,
    UnsupportedOpError,
)

# Note [Lazy public names]
# `import fxdepass` loads only the errors; every other public name is imported on first use from the module
# that owns it (PEP 562).  So a script that catches fxdepass.FxDePassError, reads a saved attribution or runs
# the command line's --help loads neither torch nor networkx, pydot or matplotlib, and the compiler never
# loads the inspection layer (graph, export, report) unless it is asked for.  A name below is "module" for a
# submodule itself, else (module, name in it).
_LAZY: dict[str, str | tuple[str, str]] = {
    **{name: (".api", name) for name in ("compile", "DecomposedModel", "GeneratedAttribution")},
    **{name: (".results", name) for name in ("Attribution", "load_attribution")},
    "ablate": (".ablation", "ablate"),
    "load": (".models", "load"),
    **{name: (".lens", name) for name in ("LayerLens", "layer_lens", "plot_layers")},
    "LogitTarget": (".targets", "Target"),
    **{name: (".targets", name) for name in ("diff", "logprob")},
    **{name: (".graph", name) for name in ("Target", "build_graph", "resolve_target", "seed_graph")},
    **{name: (".seeds", name) for name in (
        "Custom", "DirectHeads", "DirectModules", "Heads", "Modules", "Neurons", "Seed", "Subspace", "Tokens",
        "custom", "heads", "modules", "neurons", "orthogonal_projector", "subspace", "tokens")},
    **{name: f".{name}" for name in ("dataset", "export", "plots", "report", "results")},
}


def __getattr__(name: str) -> Any:
    """Import a public name (Note [Lazy public names]) or a submodule (``fxdepass.graph``) when first used.

    >>> fxdepass.build_graph                     # imports fxdepass.graph (and networkx) now   # doctest: +SKIP
    """
    where = _LAZY.get(name)
    if where is None:
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = importlib.import_module(where, __name__) if isinstance(where, str) else \
        getattr(importlib.import_module(where[0], __name__), where[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "compile", "load", "DecomposedModel", "Attribution", "GeneratedAttribution", "ablate",
    "load_attribution", "plot_layers", "results", "plots", "dataset",
    "build_graph", "seed_graph", "Target", "resolve_target", "export", "report",
    "diff", "logprob", "LogitTarget", "layer_lens", "LayerLens",
    "tokens", "heads", "neurons", "modules", "subspace", "custom", "orthogonal_projector",
    "Seed", "Tokens", "Heads", "Neurons", "Modules", "DirectHeads", "DirectModules", "Subspace", "Custom",
    "FxDePassError", "UnsupportedOpError", "CaptureError", "InvalidSeedError", "InvalidReadoutError",
    "InvalidInputError", "OutOfMemoryEstimateError", "ReconstructionError", "ModelNotFoundError",
    "ModelChangedError",
]
__version__ = "0.1.0"
