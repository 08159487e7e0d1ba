"""The Triton backend: the contract functions of ``cellkern.backends``.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set
before triton is imported; bf16 has no arithmetic in the interpreter, so bf16
runs on GPU only).
"""
from .mixing import (MIXING, competitive_hebbian_, mixing_aggregate_backward, mixing_aggregate_forward,
                     mixing_propagate_backward, mixing_propagate_forward)
from .plasticity import heterosynaptic_normalize_, lateral_inhibition, local_winners, plasticity_
from .propagate import aggregate_backward, aggregate_forward, propagate_backward, propagate_forward

__all__ = ["aggregate_forward", "aggregate_backward", "propagate_forward", "propagate_backward",
           "lateral_inhibition", "local_winners", "plasticity_", "heterosynaptic_normalize_",
           "MIXING", "mixing_aggregate_forward", "mixing_aggregate_backward", "mixing_propagate_forward",
           "mixing_propagate_backward", "competitive_hebbian_"]
