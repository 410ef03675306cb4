"""Triton kernels for the semiring rules (shipped as ``semitriton.kernels``).

One module per op: its kernels, launcher and registration in ``registry``.
Importing this package needs triton; the engine imports it lazily, only when
the backend switch selects Triton.
"""

from . import registry  # noqa: F401
