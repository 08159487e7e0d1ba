"""cellkern: fused kernels for 3-D cellular neural networks."""
from . import nn, ops, schedule, sparse
from .backends import available_backends, backend_status
from .config import ScheduleConfig, StageConfig, load_config
from .memory import PROGRESSION, MemoryConfig, fit_dims, memory_estimate
from .rules import BCM, STDP, Competition, CompetitiveHebbian, PlasticityRule, PlasticityState
from .stencil import Geometry, Stencil, parse_boundary, radius, stencil
from .trainer import Trainer

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
    "CompetitiveHebbian",
    "PlasticityRule",
    "PlasticityState",
    "MemoryConfig",
    "memory_estimate",
    "fit_dims",
    "PROGRESSION",
    "schedule",
    "StageConfig",
    "ScheduleConfig",
    "load_config",
    "Trainer",
    "__version__",
]
