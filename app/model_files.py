"""Where the engine finds its files: the base model directory and each adapter's directory.

Configs name the built-in model as `builtin` and its demo adapters as `builtin:<name>`; those
are generated (offline, deterministically) on first use, on the node that runs the engine.
Anything else is a local path, used as is. Only the engine calls this: the ingress never needs
a path.
"""

from __future__ import annotations

from app.builtin_model import BUILTIN, ensure_builtin_model


def resolve_model_path(model: str) -> str:
    return str(ensure_builtin_model().model) if model == BUILTIN else model


def resolve_adapter_path(path: str) -> str:
    prefix = f"{BUILTIN}:"
    if path.startswith(prefix):
        return str(ensure_builtin_model().adapter(path.removeprefix(prefix)))
    return path
