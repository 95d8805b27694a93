"""Multi-scale deformable attention: one op, backends behind it (PyTorch reference, C++ CPU, CUDA).

`ms_deform_attn` is the torch.library op `reltag::ms_deform_attn`. The compiled kernels are built lazily
on first use (JIT, cached under $RELTAG_KERNELS_CACHE, default ~/.cache/reltag/kernels), never at import;
without a compiler the op falls back to the reference and logs why once. $RELTAG_MSDA_BACKEND
(reference | cpu | cuda) forces a backend.
"""

from kernels.dispatch import BACKEND_ENV, backend_reasons, select_backend
from kernels.op import ms_deform_attn
from kernels.reference import ms_deform_attn_reference, ms_deform_attn_reference_backward

__all__ = [
    "BACKEND_ENV",
    "backend_reasons",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "ms_deform_attn_reference_backward",
    "select_backend",
]
