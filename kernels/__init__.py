"""Multi-scale deformable attention: one op, backends behind it (PyTorch reference, C++ CPU, CUDA).

`ms_deform_attn` is the torch.library op `reltag::ms_deform_attn`. On its first call on a device type the op
chooses that type's backend once (`select_backend`: $RELTAG_MSDA_BACKEND = reference | cpu | cuda forces one,
else the compiled kernel, else the reference with a warning saying why) and registers that backend's kernels
for the device type; `reset_backends()` makes the next call choose again. The compiled kernels are built
lazily at that choice (JIT, cached under $RELTAG_KERNELS_CACHE, default ~/.cache/reltag/kernels), never at
import.
"""

from kernels.dispatch import BACKEND_ENV, backend_reasons, select_backend
from kernels.op import backend_in_use, ms_deform_attn, reset_backends
from kernels.reference import ms_deform_attn_reference, ms_deform_attn_reference_backward

__all__ = [
    "BACKEND_ENV",
    "backend_in_use",
    "backend_reasons",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "ms_deform_attn_reference_backward",
    "reset_backends",
    "select_backend",
]
