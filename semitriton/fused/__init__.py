"""Canonical fused autograd nodes for patched modules.

Each is a ``torch.autograd.Function`` whose forward reproduces the original
module's numerics, whose ``backward`` gives the ordinary gradient (so training
code keeps working), and whose ``semiring_backward(ctx)`` is the node's
semiring rule: one canonical primitive with its exact Jacobian.
"""

from .attention import FusedAttention, fused_attention
from .elementwise import CanonicalElementwise
from .linear import CanonicalLinear
from .rms_norm import CanonicalRMSNorm
from .rope import RotaryEmbedding, apply_rotary

__all__ = ["FusedAttention", "fused_attention", "CanonicalRMSNorm", "CanonicalElementwise", "CanonicalLinear",
           "RotaryEmbedding", "apply_rotary"]
