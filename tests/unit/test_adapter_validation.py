"""Adapter validation: the demo adapters pass; every broken copy is rejected by name.

Each rejection case copies a demo adapter (rank 8, every projection, experts included) into
tmp_path and breaks exactly one thing, then checks the message names that thing and that the
directory was left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from app.adapter_validation import (
    AdapterRejected,
    LoraTargets,
    ValidatedAdapter,
    validate_adapter_dir,
)
from app.builtin_model import DEMO_ADAPTERS, MODEL_CONFIG, lora_target_shapes

MAX_RANK = 16
MAX_BYTES = 64 << 20
RANK8 = "acme-support"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
EXPERT = "base_model.model.model.layers.1.mlp.experts.5.up_proj"
HIDDEN = MODEL_CONFIG["hidden_size"]


@pytest.fixture(scope="module")
def targets(builtin) -> LoraTargets:
    return LoraTargets.from_model_dir(builtin.model)


@pytest.fixture
def adapter(builtin, tmp_path) -> Path:
    """A private copy of the rank-8 demo adapter, free to break."""
    return Path(shutil.copytree(builtin.adapter(RANK8), tmp_path / "adapter"))


def validate(path: Path, targets: LoraTargets, **limits) -> ValidatedAdapter:
    return validate_adapter_dir(
        path,
        targets,
        max_rank=limits.get("max_rank", MAX_RANK),
        max_bytes=limits.get("max_bytes", MAX_BYTES),
    )


# --- helpers that break one thing ---------------------------------------------------------------


def edit_config(**changes) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        config = json.loads((d / "adapter_config.json").read_text())
        for key, value in changes.items():
            if value is _DELETE:
                config.pop(key)
            else:
                config[key] = value
        (d / "adapter_config.json").write_text(json.dumps(config))

    return apply


_DELETE = object()


def edit_tensors(change: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        tensors = load_file(d / "adapter_model.safetensors")
        change(tensors)
        save_file(tensors, d / "adapter_model.safetensors")

    return apply


def write_file(name: str, data: bytes = b"x") -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)

    return apply


def remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def symlink(name: str, to: str) -> Callable[[Path], None]:
    return lambda d: os.symlink(to, d / name)


def rename_tensor(old: str, new: str):
    return edit_tensors(lambda t: t.__setitem__(new, t.pop(old)))


def set_tensor(name: str, value: Callable[[np.ndarray], np.ndarray]):
    return edit_tensors(lambda t: t.__setitem__(name, value(t[name])))


def drop_tensor(name: str):
    return edit_tensors(lambda t: t.pop(name))


def with_value(index: tuple[int, int], value: float):
    def change(array: np.ndarray) -> np.ndarray:
        array = array.copy()
        array[index] = value
        return array

    return change


def truncate_weights(d: Path) -> None:
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def empty_weights(d: Path) -> None:
    save_file({}, d / "adapter_model.safetensors")


REJECTIONS: list[tuple[str, Callable[[Path], None], str]] = [
    # files
    ("pickled-bin", write_file("training_args.bin"), "training_args.bin: pickled formats"),
    ("pickled-pt", write_file("adapter_model.pt"), "adapter_model.pt: pickled formats"),
    (
        "pickled-nested",
        write_file("checkpoint-1/optimizer.pth"),
        "checkpoint-1/optimizer.pth: pickled",
    ),
    ("pickled-ckpt", write_file("rng_state.ckpt"), "rng_state.ckpt: pickled formats"),
    ("no-config", remove("adapter_config.json"), "adapter_config.json is missing"),
    ("no-weights", remove("adapter_model.safetensors"), "adapter_model.safetensors is missing"),
    ("symlink-file", symlink("README.md", "/etc/hostname"), "README.md is a symlink"),
    ("symlink-dir", symlink("more", "/etc"), "more is a symlink"),
    ("backslash-name", write_file("..\\evil.json"), "file name '..\\\\evil.json'"),
    ("newline-name", write_file("a\nb.json"), "file name 'a\\nb.json'"),
    ("fifo", lambda d: os.mkfifo(d / "pipe"), "pipe is not a regular file"),
    # adapter_config.json
    ("config-not-json", write_file("adapter_config.json", b"{r: 8"), "not valid JSON"),
    ("config-not-object", write_file("adapter_config.json", b"[1]"), "must hold a JSON object"),
    ("peft-type", edit_config(peft_type="LOHA"), "peft_type: expected 'LORA', got 'LOHA'"),
    ("rank-zero", edit_config(r=0), "r: expected an integer in 1..16 (max_lora_rank), got 0"),
    ("rank-over-max", edit_config(r=32), "r: expected an integer in 1..16 (max_lora_rank), got 32"),
    ("rank-string", edit_config(r="8"), "r: expected an integer in 1..16 (max_lora_rank), got '8'"),
    ("rank-bool", edit_config(r=True), "got True"),
    ("alpha-missing", edit_config(lora_alpha=_DELETE), "lora_alpha: expected a positive number"),
    ("dora", edit_config(use_dora=True), "use_dora: not supported"),
    ("modules-to-save", edit_config(modules_to_save=["lm_head"]), "modules_to_save: not supported"),
    ("bias", edit_config(bias="all"), "bias: expected 'none'"),
    ("rank-pattern", edit_config(rank_pattern={"q_proj": 4}), "rank_pattern: 'q_proj' -> 4"),
    ("alpha-pattern", edit_config(alpha_pattern={"q_proj": 4}), "alpha_pattern: 'q_proj' -> 4"),
    ("layers-to-transform", edit_config(layers_to_transform=[0]), "layers_to_transform: not"),
    ("target-parameters", edit_config(target_parameters=["experts.gate_up_proj"]), "target_par"),
    ("pissa-init", edit_config(init_lora_weights="pissa"), "init_lora_weights: 'pissa'"),
    ("no-target-modules", edit_config(target_modules=[]), "target_modules: expected a non-empty"),
    ("backtracking-regex", edit_config(target_modules=r"(.*_)+proj"), "nests quantifiers"),
    ("bad-regex", edit_config(target_modules=r".*(q_proj"), "target_modules: invalid regex"),
    # adapter_model.safetensors
    ("not-safetensors", truncate_weights, "not a valid safetensors file"),
    ("no-tensors", empty_weights, "adapter_model.safetensors holds no tensors"),
    (
        "name-without-prefix",
        rename_tensor(f"{Q0}.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_A.weight"),
        "tensor 'model.layers.0.self_attn.q_proj.lora_A.weight': expected a name of the form",
    ),
    (
        "name-adapter-suffix",
        rename_tensor(f"{Q0}.lora_A.weight", f"{Q0}.lora_A.default.weight"),
        "lora_A.default.weight': expected a name of the form",
    ),
    (
        "module-not-in-base",
        edit_tensors(
            lambda t: t.update(
                {
                    "base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight": t[
                        f"{Q0}.lora_A.weight"
                    ],
                    "base_model.model.model.layers.0.self_attn.x_proj.lora_B.weight": t[
                        f"{Q0}.lora_B.weight"
                    ],
                }
            )
        ),
        "module 'model.layers.0.self_attn.x_proj' does not exist in the base model",
    ),
    (
        "expert-beyond-base",
        edit_tensors(
            lambda t: t.update(
                {
                    f"{EXPERT.replace('.5.', '.8.')}.lora_A.weight": t[f"{EXPERT}.lora_A.weight"],
                    f"{EXPERT.replace('.5.', '.8.')}.lora_B.weight": t[f"{EXPERT}.lora_B.weight"],
                }
            )
        ),
        "module 'model.layers.1.mlp.experts.8.up_proj' does not exist in the base model",
    ),
    (
        "module-not-targeted",
        edit_config(
            target_modules=["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        ),
        "module 'model.layers.0.self_attn.q_proj' is not matched by adapter_config.json "
        "target_modules",
    ),
    (
        "lora-a-without-b",
        drop_tensor(f"{EXPERT}.lora_B.weight"),
        "module 'model.layers.1.mlp.experts.5.up_proj' has lora_A but no lora_B",
    ),
    (
        "lora-b-without-a",
        drop_tensor(f"{Q0}.lora_A.weight"),
        "module 'model.layers.0.self_attn.q_proj' has lora_B but no lora_A",
    ),
    (
        "a-transposed",
        set_tensor(f"{Q0}.lora_A.weight", lambda a: np.ascontiguousarray(a.T)),
        f"tensor '{Q0}.lora_A.weight': expected shape [8, {HIDDEN}], got [{HIDDEN}, 8]",
    ),
    (
        "expert-b-wrong-out",
        set_tensor(f"{EXPERT}.lora_B.weight", lambda b: np.zeros((HIDDEN, 8), np.float32)),
        f"tensor '{EXPERT}.lora_B.weight': expected shape "
        f"[{MODEL_CONFIG['moe_intermediate_size']}, 8], got [{HIDDEN}, 8]",
    ),
    (
        "rank-disagrees-with-config",
        edit_config(r=16, lora_alpha=32),
        "experts.0.down_proj.lora_A.weight': expected shape [16, 128], got [8, 128]",
    ),
    (
        "integer-dtype",
        set_tensor(f"{Q0}.lora_A.weight", lambda a: a.astype(np.int32)),
        f"tensor '{Q0}.lora_A.weight': dtype I32 is not one of F16, BF16, F32, F64",
    ),
    (
        "nan",
        set_tensor(f"{EXPERT}.lora_B.weight", with_value((3, 2), np.nan)),
        f"tensor '{EXPERT}.lora_B.weight' has non-finite values (NaN or infinity), first at flat "
        "index 26",
    ),
    (
        "infinity-fp16",
        set_tensor(
            f"{Q0}.lora_A.weight", lambda a: with_value((0, 1), -np.inf)(a.astype(np.float16))
        ),
        f"tensor '{Q0}.lora_A.weight' has non-finite values (NaN or infinity), first at flat "
        "index 1",
    ),
]


def tree_state(d: Path) -> dict[str, tuple[bytes | str, int]]:
    state = {}
    for p in sorted(d.rglob("*")):
        st = os.lstat(p)
        content = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else ""
        state[str(p.relative_to(d))] = (content, st.st_mtime_ns)
    return state


def test_every_demo_adapter_passes(builtin, targets):
    for demo in DEMO_ADAPTERS:
        result = validate(builtin.adapter(demo.name), targets)
        assert (result.rank, result.alpha) == (demo.rank, demo.alpha)
        assert result.tensor_count == 2 * len(lora_target_shapes())
        assert set(result.adapted_modules) == set(lora_target_shapes())
        assert result.target_modules == (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        )
        files = ("adapter_config.json", "adapter_model.safetensors")
        assert result.size_bytes == sum(
            (builtin.adapter(demo.name) / f).stat().st_size for f in files
        )
        assert len(result.sha256) == 64 and result.shapes_unchecked == ()


def test_base_model_targets_come_from_headers(targets):
    expected = {m: (out, fan_in) for m, (fan_in, out) in lora_target_shapes().items()}
    assert {m: s for m, s in targets.shapes.items() if m in expected} == expected
    # Linear modules beyond the demo's targets are known too; embeddings are not LoRA targets.
    assert {"lm_head", "model.layers.0.mlp.gate"} <= set(targets.shapes)
    assert "model.embed_tokens" not in targets.shapes
    assert targets.fused_experts == {} and targets.notes == ()


@pytest.mark.parametrize(
    ("breakage", "message"), [(b, m) for _, b, m in REJECTIONS], ids=[i for i, _, _ in REJECTIONS]
)
def test_rejection_names_the_problem(adapter, targets, breakage, message):
    breakage(adapter)
    before = tree_state(adapter)
    with pytest.raises(AdapterRejected) as caught:
        validate(adapter, targets)
    assert message in str(caught.value)
    assert tree_state(adapter) == before  # nothing modified


def test_size_is_checked_before_any_tensor_is_read(adapter, targets):
    set_tensor(f"{Q0}.lora_A.weight", with_value((0, 0), np.nan))(adapter)
    size = sum(p.stat().st_size for p in adapter.iterdir())
    with pytest.raises(
        AdapterRejected, match=f"adapter is {size} bytes, more than the limit of 1000"
    ):
        validate(adapter, targets, max_bytes=1000)


def test_adapter_directory_itself_may_not_be_a_symlink(adapter, targets, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(adapter)
    with pytest.raises(AdapterRejected, match="is a symlink"):
        validate(link, targets)
    with pytest.raises(AdapterRejected, match="is not a directory"):
        validate(adapter / "adapter_config.json", targets)


def test_extra_plain_files_are_allowed_and_part_of_the_digest(adapter, targets):
    first = validate(adapter, targets)
    (adapter / "README.md").write_text("fine-tuned on support tickets\n")
    second = validate(adapter, targets)
    assert second.sha256 != first.sha256 and second.size_bytes > first.size_bytes
    assert validate(adapter, targets).sha256 == second.sha256  # deterministic


def test_regex_target_modules_and_exclusions_follow_peft(adapter, targets):
    edit_config(target_modules=r".*\.(q|k|v|o|gate|up|down)_proj")(adapter)
    assert validate(adapter, targets).target_modules == (r".*\.(q|k|v|o|gate|up|down)_proj",)
    edit_config(target_modules="all-linear")(adapter)
    validate(adapter, targets)
    edit_config(exclude_modules=["q_proj"])(adapter)
    with pytest.raises(
        AdapterRejected, match=r"q_proj' is not matched .* \(exclude_modules \['q_proj'\]\)"
    ):
        validate(adapter, targets)


def test_rank_pattern_equal_to_the_rank_is_harmless(adapter, targets):
    edit_config(rank_pattern={"q_proj": 8}, alpha_pattern={"k_proj": 16})(adapter)
    assert validate(adapter, targets).rank == 8


def write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """safetensors by hand, for dtypes numpy cannot hold (bfloat16) and for 3-D fused experts."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def bf16(values: np.ndarray) -> bytes:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def test_bfloat16_is_accepted_and_its_nan_found(adapter, targets):
    tensors = load_file(adapter / "adapter_model.safetensors")
    raw = {n: ("BF16", list(t.shape), bf16(t)) for n, t in tensors.items()}
    write_raw_safetensors(adapter / "adapter_model.safetensors", raw)
    assert validate(adapter, targets).size_bytes < 719888
    poisoned = tensors[f"{Q0}.lora_B.weight"].copy()
    poisoned[5, 0] = np.nan
    raw[f"{Q0}.lora_B.weight"] = ("BF16", list(poisoned.shape), bf16(poisoned))
    write_raw_safetensors(adapter / "adapter_model.safetensors", raw)
    with pytest.raises(AdapterRejected, match=r"lora_B.weight' has non-finite values .* index 40"):
        validate(adapter, targets)


def test_sharded_checkpoint_is_read_through_its_index(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    f32 = lambda *shape: ("F32", list(shape), bytes(4 * int(np.prod(shape))))  # noqa: E731
    write_raw_safetensors(
        model / "model-00001-of-00002.safetensors",
        {
            "model.layers.0.self_attn.q_proj.weight": f32(64, 32),
            "model.embed_tokens.weight": f32(100, 32),
        },
    )
    write_raw_safetensors(
        model / "model-00002-of-00002.safetensors",
        {
            "model.layers.0.mlp.experts.0.down_proj.weight": f32(32, 16),
            "model.norm.weight": f32(32),
        },
    )
    weight_map = {
        "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors",
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.layers.0.mlp.experts.0.down_proj.weight": "model-00002-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors",
    }
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    targets = LoraTargets.from_model_dir(model)
    assert targets.shapes == {
        "model.layers.0.self_attn.q_proj": (64, 32),
        "model.layers.0.mlp.experts.0.down_proj": (32, 16),
    }
    weight_map["model.norm.weight"] = "../elsewhere.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="not a plain file name"):
        LoraTargets.from_model_dir(model)


def test_fused_experts_are_flagged_and_checked_for_consistency_only(tmp_path):
    """GPT-OSS stores experts as 3-D tensors: per-expert adapter shapes are not pretended."""
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir()
    adapter.mkdir()
    write_raw_safetensors(
        model / "model.safetensors",
        {
            "model.layers.0.self_attn.q_proj.weight": ("BF16", [64, 32], bytes(2 * 64 * 32)),
            "model.layers.0.mlp.experts.gate_up_proj": (
                "BF16",
                [4, 32, 128],
                bytes(2 * 4 * 32 * 128),
            ),
            "model.layers.0.mlp.experts.down_proj": ("BF16", [4, 64, 32], bytes(2 * 4 * 64 * 32)),
        },
    )
    targets = LoraTargets.from_model_dir(model)
    assert targets.fused_experts == {"model.layers.0.mlp.experts": 4}
    assert "fused 3-D" in targets.notes[0]
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["gate_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    pair = lambda e, out=64: {  # noqa: E731
        f"base_model.model.model.layers.0.mlp.experts.{e}.gate_proj.lora_A.weight": np.zeros(
            (2, 32), np.float32
        ),
        f"base_model.model.model.layers.0.mlp.experts.{e}.gate_proj.lora_B.weight": np.zeros(
            (out, 2), np.float32
        ),
    }
    save_file(pair(0) | pair(3), adapter / "adapter_model.safetensors")
    result = validate(adapter, targets)
    assert result.shapes_unchecked == (
        "model.layers.0.mlp.experts.0.gate_proj",
        "model.layers.0.mlp.experts.3.gate_proj",
    )
    save_file(pair(0) | pair(4), adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterRejected, match="expert 4 does not exist .* has 4 experts"):
        validate(adapter, targets)
    save_file(pair(0) | pair(1, out=32), adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterRejected, match="experts.1.gate_proj'.* differ from"):
        validate(adapter, targets)
