"""Live tensor memory on any device, from the dispatcher: the bytes of the
tensors that ops created and that are still alive, and their peak.

CPU tensors have no allocator statistics (``torch.cuda.max_memory_allocated``
has no CPU twin), so :class:`LiveBytes` counts for itself: every new storage an
op returns (not one of its inputs: views and in-place results are not new)
adds its bytes, and a finalizer subtracts them when the tensor dies. Tensors
the autograd graph saves stay alive, and counted, until backward frees them.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Context manager: ``live`` and ``peak`` bytes of the tensors created inside it.

    Example:
        >>> with LiveBytes() as m:
        ...     a = torch.ones(1024)
        ...     b = a * 2
        >>> m.peak
        8192
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict = {}

    def _free(self, key):
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in inputs or key in self._seen or st.nbytes() == 0:
                continue
            self._seen[key] = st.nbytes()
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, key)
        return out

    def reset_peak(self) -> None:
        self.peak = self.live
