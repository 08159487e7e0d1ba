"""Public functional ops. Each module: validation → dispatch → kernel."""
from .competition import activity, lateral_inhibition, local_winners
from .mixing import competitive_hebbian_step_
from .plasticity import bcm_, heterosynaptic_normalize_, plasticity_step_, stdp_, synapse_l1
from .propagate import aggregate, propagate, propagate_steps

__all__ = [
    "aggregate", "propagate", "propagate_steps",
    "activity", "lateral_inhibition", "local_winners",
    "stdp_", "bcm_", "plasticity_step_", "synapse_l1", "heterosynaptic_normalize_",
    "competitive_hebbian_step_",
]
