"""DePass rewrite rules, one module per op family; importing this package fills ``fxdepass.registry.RULES``.

==================  =========================================================================
module              ops
==================  =========================================================================
``linear``          views, reshapes, indexing, concatenation, scatters, reductions, ``linear``/
                    ``addmm``/``matmul``/``einsum``, convolutions, Fourier transforms, elementwise
                    ``add``/``sub``/``mul``/``div``, casts
``norms``           ``layer_norm``, ``rms_norm`` (scale frozen, centring per component) and norm
                    statistics
``attention``       ``scaled_dot_product_attention`` (probabilities frozen), softmax
``activations``     activation allocation (softmax / linear / max) and elementwise gates
``products``        the symmetric split of a product of two decomposed tensors
``routing``         comparisons, top-k, sorting, argmax, masks: frozen; mixture-of-experts kernels
==================  =========================================================================
"""
from . import activations, attention, linear, norms, products, routing  # noqa: F401
