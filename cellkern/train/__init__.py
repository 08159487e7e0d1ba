"""The training application: the staged schedule of SPEC §6–§9 on the library's ops.

``config`` (the schedule, profiles and the default stages), ``transfer``
(between stages), ``planning`` (memory budget), ``trainer`` (the loop),
``layouts`` (the tensors' layout over torchrun processes), ``checkpoint``,
``monitor`` (readout and decoder monitor), ``emergence``, ``clustering``,
``data``, ``report`` and ``cli`` (the ``cellkern`` command). It reaches the
kernels only through the library's public ops; the library never imports it.
"""
from .config import ScheduleConfig, StageConfig, load_config
from .trainer import Trainer

__all__ = ["ScheduleConfig", "StageConfig", "load_config", "Trainer"]
