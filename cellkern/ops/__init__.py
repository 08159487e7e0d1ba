"""Public functional ops. Each module: validation → dispatch → autograd.Function."""
from .propagate import aggregate, propagate, propagate_steps

__all__ = ["aggregate", "propagate", "propagate_steps"]
