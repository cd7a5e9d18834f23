"""The node settings scripts/serve.sh exports (app/node_env.py), through a real shell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from app.node_env import NODE_ENV_DEFAULTS, node_env

ROOT = Path(__file__).resolve().parents[2]


def exported_by_the_shell(environ: dict[str, str]) -> dict[str, str]:
    """What `eval "$(python -m app.node_env)"` (scripts/serve.sh's line) leaves exported."""
    script = f'eval "$({sys.executable} -m app.node_env)" && env -0'
    out = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=environ, capture_output=True, check=True
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def test_the_defaults_are_exported_where_unset():
    environ = {k: v for k, v in os.environ.items() if k not in NODE_ENV_DEFAULTS}
    exported = exported_by_the_shell(environ)
    for name, value in NODE_ENV_DEFAULTS.items():
        assert exported[name] == value


def test_an_operators_value_wins():
    name = next(iter(NODE_ENV_DEFAULTS))
    environ = {**os.environ, name: "2.5"}
    assert exported_by_the_shell(environ)[name] == "2.5"
    assert node_env(environ)[name] == "2.5"
    assert node_env({})[name] == NODE_ENV_DEFAULTS[name]
