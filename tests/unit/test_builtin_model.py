"""The built-in model is generated offline, deterministically, in formats HF and PEFT users know."""

from __future__ import annotations

import json

from safetensors import safe_open

from app.builtin_model import DEMO_ADAPTERS, MODEL_CONFIG, ensure_builtin_model, tree_digest

# sha256 over every generated file (app.builtin_model.tree_digest). Changing the generator must
# change BUILTIN_VERSION and this digest together.
EXPECTED_DIGEST = "517922f96dbaa841d6b617646cb66252d01128f3927bd833dd5fdef1c6a7d45b"


def test_generation_is_byte_identical_and_pinned(tmp_path):
    first = ensure_builtin_model(tmp_path / "a")
    second = ensure_builtin_model(tmp_path / "b")
    assert tree_digest(first.root) == tree_digest(second.root) == EXPECTED_DIGEST


def test_second_call_reuses_the_cache(tmp_path):
    paths = ensure_builtin_model(tmp_path)
    stamp = (paths.model / "model.safetensors").stat().st_mtime_ns
    ensure_builtin_model(tmp_path)
    assert (paths.model / "model.safetensors").stat().st_mtime_ns == stamp


def test_model_is_a_qwen3_moe_with_chat_template(builtin):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(builtin.model)
    assert config.model_type == "qwen3_moe"
    assert (config.num_experts, config.num_experts_per_tok) == (8, 2)
    tok = AutoTokenizer.from_pretrained(builtin.model)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Where is my order?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == "<|im_start|>user\nWhere is my order?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < MODEL_CONFIG["vocab_size"]
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"


def test_demo_adapters_are_peft_lora_with_mixed_ranks_on_every_projection(builtin):
    ranks = set()
    for adapter in DEMO_ADAPTERS:
        d = builtin.adapter(adapter.name)
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == adapter.rank
        ranks.add(cfg["r"])
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            keys = set(f.keys())
            a = f.get_tensor("base_model.model.model.layers.1.mlp.experts.5.up_proj.lora_A.weight")
            b = f.get_tensor("base_model.model.model.layers.1.mlp.experts.5.up_proj.lora_B.weight")
        assert a.shape == (adapter.rank, MODEL_CONFIG["hidden_size"])
        assert b.shape == (MODEL_CONFIG["moe_intermediate_size"], adapter.rank)
        for module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            assert any(f".{module}.lora_A.weight" in k for k in keys), module
        assert not any(k.endswith("mlp.gate.lora_A.weight") for k in keys)  # router untouched
    assert ranks == {8, 16}
