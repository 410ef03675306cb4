"""Access to a custom node's saved tensors with semitriton's freed-graph error."""

from __future__ import annotations

from ..errors import GraphFreedError


def saved_tensors(node):
    try:
        return node.saved_tensors
    except RuntimeError as exc:
        raise GraphFreedError(
            f"the saved tensors of autograd node {type(node).__name__} were already freed by an earlier "
            "backward pass; run the forward again, or pass retain_graph=True to the earlier backward "
            f"(torch said: {str(exc).splitlines()[0]})") from exc


def pad(values, n):
    """Rule outputs padded with None to the node's number of inputs."""
    values = list(values)[:n]
    return values + [None] * (n - len(values))
