"""Triton kernels for the semiring rules (shipped as ``semitriton.kernels``).

One module per op: its kernels, launcher and registration in ``registry``.
Importing this package needs triton; the engine imports it lazily, only when
the backend switch selects Triton. The kernel modules import torch lazily, so
that their ahead-of-time compile specs (``aot_specs()``) can be built in an
environment with triton but without torch.
"""

from . import registry  # noqa: F401
from . import attention, elementwise, logspace_gemm, matmul, norm, rms_norm, softmax  # noqa: F401,E402  (registration side effects)
