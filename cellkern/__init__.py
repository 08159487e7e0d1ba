"""cellkern: fused kernels for 3-D cellular neural networks."""
from . import nn, ops, sparse
from .backends import available_backends, backend_status
from .rules import BCM, STDP, Competition, PlasticityRule, PlasticityState
from .stencil import Geometry, Stencil, parse_boundary, radius, stencil

__version__ = "0.1.0"

__all__ = [
    "ops",
    "nn",
    "sparse",
    "available_backends",
    "backend_status",
    "stencil",
    "radius",
    "Stencil",
    "Geometry",
    "parse_boundary",
    "STDP",
    "BCM",
    "Competition",
    "PlasticityRule",
    "PlasticityState",
    "__version__",
]
