"""fxdepass: exact DePass attribution for any Hugging Face transformer.

>>> import fxdepass
>>> decomposed = fxdepass.compile(model, dtype=torch.float64)        # doctest: +SKIP
>>> attribution = decomposed.attribute(input_ids)                    # doctest: +SKIP
>>> attribution.scores()        # each input token's contribution to the predicted logit
"""
from fxdepass import rules  # noqa: F401  (fills the rule table)

from . import dataset, export, plots, report, results
from .ablation import ablate
from .api import Attribution, DecomposedModel, GeneratedAttribution, compile
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
from .models import load
from .lens import LayerLens, layer_lens
from .targets import Target as LogitTarget, diff, logprob
from .plots import plot_layers
from .results import load_attribution
from .graph import Target, build_graph, resolve_target, seed_graph
from .seeds import (
    Custom,
    DirectHeads,
    DirectModules,
    Heads,
    Modules,
    Neurons,
    Seed,
    Subspace,
    Tokens,
    custom,
    heads,
    modules,
    neurons,
    orthogonal_projector,
    subspace,
    tokens,
)

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
