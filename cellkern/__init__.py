"""cellkern: fused kernels for 3-D cellular neural networks.

The library: ``ops`` (the fused ops), ``nn`` (modules), ``sparse``, the
stencils, the plasticity rules, memory planning and ``distributed``. The
training application (the staged schedule, the trainer, its CLI) lives in
:mod:`cellkern.train` and is imported only when used: ``ck.Trainer``,
``ck.ScheduleConfig``, ``ck.StageConfig`` and ``ck.load_config`` load it on
first access (``pip install cellkern[train]`` brings its dependencies).
"""
from . import backends, nn, ops, sparse
from .backends import available_backends, backend_status
from .memory import PROGRESSION, MemoryConfig, fit_dims, memory_estimate
from .rules import BCM, STDP, Competition, CompetitiveHebbian, PlasticityRule, PlasticityState
from .stencil import Geometry, Stencil, parse_boundary, radius, stencil

__version__ = "0.1.0"

#: names re-exported from the training application, loaded on first access
_TRAIN_NAMES = {"Trainer": "trainer", "ScheduleConfig": "config", "StageConfig": "config", "load_config": "config"}

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
    *_TRAIN_NAMES,
    "__version__",
]


def __getattr__(name: str):
    if name in _TRAIN_NAMES:
        import importlib

        return getattr(importlib.import_module(f".train.{_TRAIN_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'cellkern' has no attribute {name!r}")


backends.load_all()
