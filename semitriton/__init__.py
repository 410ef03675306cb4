"""semitriton: backpropagation generalised to semirings, at GPU speed.

    import semitriton
    (flow,) = semitriton.grad(score, embeddings, semiring="abs")

See README.md for the semiring table and the command-line tool.
"""

from __future__ import annotations

from . import cuda_graph, semirings
from .backend import use as use_backend
from .engine import GradientGraph, grad, grad_values
from .errors import GraphError, GraphFreedError, SemitritonError, UnsupportedNodeError
from .patching import is_patched, patch, patch_summary, unpatch
from .branches import ATTN_BRANCHES, MLP_BRANCHES, NO_PATH, BranchAttribution, branch_attribution
from .paths import Path, PathGraph, PathStep, sample_paths, top_paths
from .readouts import log_readout, token_readout, token_values
from .semirings import Semiring
from .tracking import track, untrack

__version__ = "0.1.0"

__all__ = [
    "grad", "grad_values", "branch_attribution", "BranchAttribution", "ATTN_BRANCHES", "MLP_BRANCHES", "NO_PATH", "top_paths", "sample_paths", "Path", "PathStep", "PathGraph", "token_readout", "token_values", "log_readout", "semirings", "Semiring",
    "track", "untrack", "use_backend", "patch", "unpatch", "patch_summary", "is_patched", "GradientGraph", "SemitritonError", "UnsupportedNodeError",
    "GraphError", "GraphFreedError", "cuda_graph", "__version__",
]
