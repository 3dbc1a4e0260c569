"""fxdepass: exact DePass attribution for any Hugging Face transformer.

>>> import fxdepass
>>> decomposed = fxdepass.compile(model, dtype=torch.float64)        # doctest: +SKIP
>>> attribution = decomposed.attribute(input_ids)                    # doctest: +SKIP
>>> attribution.scores()        # each input token's contribution to the predicted logit
"""
from fxdepass import rules  # noqa: F401  (fills the rule table)

from .api import Attribution, DecomposedModel, compile
from .errors import (
    CaptureError,
    FxDePassError,
    InvalidInputError,
    InvalidReadoutError,
    InvalidSeedError,
    UnsupportedOpError,
)
from .seeds import Seed, Tokens, tokens

__all__ = [
    "compile", "DecomposedModel", "Attribution", "tokens", "Tokens", "Seed",
    "FxDePassError", "UnsupportedOpError", "CaptureError", "InvalidSeedError", "InvalidReadoutError",
    "InvalidInputError",
]
__version__ = "0.1.0"
