"""Validation of a PEFT LoRA adapter directory before anything serves it.

An adapter comes from a tenant, so its files are untrusted input to the engine: a pickled file
could run code when unpickled, a wrong shape or a NaN corrupts every batch the adapter shares, a
huge file exhausts memory. `validate_adapter_dir` reads the directory listing (sizes are checked
there, before any file is opened), the JSON config, the safetensors header (names, dtypes,
shapes) and only then the tensor bytes themselves (for finiteness, through a memory map). It
never unpickles or even opens a pickled file, never writes anything, and rejects with
`AdapterRejected`, whose message names the file, tensor or field and what was expected.

`LoraTargets.from_model_dir` describes what an adapter may adapt: every 2-D `<module>.weight` of
the base checkpoint, read from safetensors headers only. Which of those modules the engine can
actually serve LoRA on is the engine's own check at load time; this one guarantees an adapter
addresses real modules with the right shapes.

Pure Python (json, safetensors headers, numpy): importable without torch, vLLM or Ray.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Formats that are (or may be) pickles: refused on sight, never opened.
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Letters, digits and ._+- only: no name can then be a path trick on any filesystem, in an
# object key or in a log line.
SAFE_FILE_NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9._+-]{1,255}")
MAX_CONFIG_BYTES = 1 << 20
# A target_modules regex comes from the tenant and runs here: short, and no quantified group
# that itself holds a quantifier (the shape of catastrophic backtracking, e.g. `(a+)+`).
MAX_REGEX_CHARS = 512
NESTED_QUANTIFIER = re.compile(r"\([^()]*[*+}][^()]*\)\s*[*+{]")
MAX_FILES = 1000
TENSOR_NAME = re.compile(
    r"base_model\.model\.(?P<module>[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)\.(?P<side>lora_A|lora_B)\.weight"
)
# safetensors dtype -> (unsigned integer of the same width, exponent mask): a value is NaN or
# infinite exactly when all its exponent bits are set (IEEE 754; bfloat16 alike).
FLOAT_DTYPES = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_FINITE_CHECK_CHUNK = 1 << 23  # elements per step: bounded temporary memory on huge tensors

# PEFT options whose effect this server does not implement; a non-default value is refused
# rather than silently served as something else. Value: the harmless defaults.
UNSUPPORTED_OPTIONS: dict[str, tuple] = {
    "use_dora": (None, False),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, [], ()),
    "layers_pattern": (None, [], ""),
    "fan_in_fan_out": (None, False),
    "lora_bias": (None, False),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (None, False),
    "use_bdlora": (None, {}, False),
    "megatron_config": (None, {}),
}
# Initialisations that rewrite the base weights when PEFT loads the adapter (PiSSA, OLoRA, ...).
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


class AdapterRejected(ValueError):
    """The adapter may not be served; the message says exactly why."""


@dataclass(frozen=True)
class LoraTargets:
    """What LoRA can adapt in a base model, from its safetensors headers.

    `shapes`: module path -> (out_features, in_features), one entry per 2-D `<module>.weight`
    (per-expert modules such as `model.layers.0.mlp.experts.3.gate_proj` included; embeddings
    excluded, LoRA on them is a different layout).

    `fused_experts`: experts module path (e.g. `model.layers.0.mlp.experts`) -> number of
    experts, for checkpoints that store experts as 3-D fused tensors (GPT-OSS, or MXFP4 blocks).
    Their per-expert in/out features cannot be read honestly from the header (the fused layout
    and orientation differ between checkpoints), so for an adapter module
    `<fused experts path>.<e>.<projection>` validation checks the expert index, the rank, that
    A is (r, k) and B is (n, r), and that every expert of a layer has the same (n, k) for a
    projection; not n and k against the base. `ValidatedAdapter.shapes_unchecked` lists them.
    """

    shapes: Mapping[str, tuple[int, int]]
    fused_experts: Mapping[str, int] = field(default_factory=dict)

    @property
    def notes(self) -> tuple[str, ...]:
        if not self.fused_experts:
            return ()
        return (
            f"{len(self.fused_experts)} experts modules are stored as fused 3-D tensors: "
            "per-expert adapter shapes are checked for consistency, not against the base",
        )

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> LoraTargets:
        shapes: dict[str, tuple[int, int]] = {}
        fused: dict[str, int] = {}
        for shard in _checkpoint_files(Path(model_dir)):
            with safe_open(str(shard), framework="numpy") as f:
                for name in f.keys():
                    shape = tuple(f.get_slice(name).get_shape())
                    if len(shape) == 2 and name.endswith(".weight"):
                        module = name.removesuffix(".weight")
                        if "embed" not in module.rsplit(".", 1)[-1]:
                            shapes[module] = (int(shape[0]), int(shape[1]))
                    elif len(shape) >= 3 and (experts := _fused_experts_path(name)):
                        fused[experts] = int(shape[0])
        if not shapes:
            raise ValueError(f"{model_dir}: no 2-D weights found in its safetensors files")
        return cls(shapes=shapes, fused_experts=fused)

    def fused_expert_of(self, module: str) -> tuple[str, int, str] | None:
        """(experts path, expert index, projection) when `module` is one expert's projection
        in a fused-experts layer, else None."""
        parts = module.rsplit(".", 2)
        if len(parts) == 3 and parts[0] in self.fused_experts and parts[1].isdigit():
            return parts[0], int(parts[1]), parts[2]
        return None


def _fused_experts_path(tensor_name: str) -> str | None:
    parts = tensor_name.split(".")
    if "experts" not in parts:
        return None
    i = parts.index("experts")
    if i + 1 < len(parts) and parts[i + 1].isdigit():
        return None
    return ".".join(parts[: i + 1])


def _checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint: the shards its index names, or all of them."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        for name in names:
            if not SAFE_FILE_NAME.fullmatch(name):
                raise ValueError(f"{index}: shard name {name!r} is not a plain file name")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no safetensors files (pickled checkpoints are not read)")
    return files


@dataclass(frozen=True)
class ValidatedAdapter:
    """What was validated; `sha256` identifies exactly these bytes (sorted names + contents)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # the config's patterns, as written
    adapted_modules: tuple[str, ...]  # base-model module paths that have an A/B pair
    tensor_count: int
    size_bytes: int
    sha256: str
    use_rslora: bool = False
    shapes_unchecked: tuple[str, ...] = ()  # modules of fused experts (see LoraTargets)


def validate_adapter_dir(
    path: Path, targets: LoraTargets, *, max_rank: int, max_bytes: int
) -> ValidatedAdapter:
    """Validate a PEFT LoRA adapter directory or raise AdapterRejected naming the problem."""
    root = Path(path)
    files = _listing(root)
    size = sum(size for _, size in files)
    if size > max_bytes:
        raise AdapterRejected(f"adapter is {size} bytes, more than the limit of {max_bytes}")
    names = {name for name, _ in files}
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in names:
            raise AdapterRejected(f"{required} is missing")
    config = _read_config(root / CONFIG_FILE)
    rank, alpha, patterns, excluded = _check_config(config, max_rank)
    # Tensor bytes are bounded by the file sizes checked above: safetensors refuses a header
    # whose offsets do not cover the file exactly.
    header = _read_header(root / WEIGHTS_FILE)
    modules, unchecked = _check_tensors(header, targets, rank, patterns, excluded)
    _check_finite(root / WEIGHTS_FILE, header)
    return ValidatedAdapter(
        rank=rank,
        alpha=alpha,
        target_modules=tuple(patterns) if isinstance(patterns, list) else (patterns,),
        adapted_modules=tuple(sorted(modules)),
        tensor_count=len(header),
        size_bytes=size,
        sha256=_digest(root, files),
        use_rslora=bool(config.get("use_rslora", False)),
        shapes_unchecked=tuple(sorted(unchecked)),
    )


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _listing(root: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every file, refusing anything that is not a plain safe file."""
    try:
        top = os.lstat(root)
    except OSError as e:
        raise AdapterRejected(f"adapter directory {root} cannot be read: {e.strerror}") from None
    if stat.S_ISLNK(top.st_mode):
        raise AdapterRejected(f"adapter directory {root} is a symlink")
    if not stat.S_ISDIR(top.st_mode):
        raise AdapterRejected(f"adapter path {root} is not a directory")
    files: list[tuple[str, int]] = []
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(root / rel_dir) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as e:
            raise AdapterRejected(f"{rel_dir or root}: cannot be listed: {e.strerror}") from None
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if not SAFE_FILE_NAME.fullmatch(entry.name):
                raise AdapterRejected(
                    f"file name {rel!r}: only letters, digits and ._+- are allowed"
                )
            if entry.name.lower().endswith(PICKLED_SUFFIXES):
                raise AdapterRejected(
                    f"{rel}: pickled formats ({', '.join(PICKLED_SUFFIXES)}) are refused; "
                    "use safetensors"
                )
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise AdapterRejected(f"{rel} is a symlink; adapters must be plain files")
            if stat.S_ISDIR(mode):
                pending.append(rel)
            elif stat.S_ISREG(mode):
                files.append((rel, entry.stat(follow_symlinks=False).st_size))
            else:
                raise AdapterRejected(f"{rel} is not a regular file")
            if len(files) > MAX_FILES:
                raise AdapterRejected(f"more than {MAX_FILES} files in the adapter directory")
    return files


def _digest(root: Path, files: Iterable[tuple[str, int]]) -> str:
    """sha256 over each file's relative path, length and bytes, in sorted order: two different
    adapters cannot share a digest by moving bytes between a name and a content."""
    h = hashlib.sha256()
    for name, size in sorted(files):
        h.update(name.encode() + b"\0" + size.to_bytes(8, "little"))
        with open(root / name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# adapter_config.json
# ---------------------------------------------------------------------------------------------


def _read_config(path: Path) -> dict:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterRejected(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterRejected(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterRejected(f"{CONFIG_FILE} must hold a JSON object, got {type(config).__name__}")
    return config


def _check_config(config: dict, max_rank: int):
    """(rank, alpha, target_modules, exclude_modules) of a plain LoRA config, or rejection."""

    def bad(field_name: str, problem: str) -> AdapterRejected:
        return AdapterRejected(f"{CONFIG_FILE}: {field_name}: {problem}")

    if config.get("peft_type") != "LORA":
        raise bad("peft_type", f"expected 'LORA', got {config.get('peft_type')!r}")
    rank = config.get("r")
    if not _is_int(rank) or not 1 <= rank <= max_rank:
        raise bad("r", f"expected an integer in 1..{max_rank} (max_lora_rank), got {rank!r}")
    alpha = config.get("lora_alpha")
    if not _is_number(alpha) or not alpha > 0:
        raise bad("lora_alpha", f"expected a positive number, got {alpha!r}")
    if config.get("bias", "none") != "none":
        raise bad(
            "bias", f"expected 'none' (bias training is not supported), got {config.get('bias')!r}"
        )
    for option, defaults in UNSUPPORTED_OPTIONS.items():
        value = config.get(option)
        if value not in defaults:
            raise bad(option, f"not supported by this server (got {value!r})")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        raise bad("init_lora_weights", f"{init!r} rewrites the base weights; not supported")
    if not isinstance(config.get("use_rslora", False), bool):
        raise bad("use_rslora", f"expected true or false, got {config.get('use_rslora')!r}")
    _check_pattern(config, "rank_pattern", rank, "ranks")
    _check_pattern(config, "alpha_pattern", alpha, "scalings")
    patterns = _module_patterns(config, "target_modules", required=True)
    excluded = _module_patterns(config, "exclude_modules", required=False)
    return rank, alpha, patterns, excluded


def _check_pattern(config: dict, option: str, global_value, what: str) -> None:
    """Per-module overrides are refused when they differ from the global value: one rank and
    one scaling per adapter is what the engine's slots hold."""
    pattern = config.get(option) or {}
    if not isinstance(pattern, dict):
        raise AdapterRejected(f"{CONFIG_FILE}: {option}: expected an object, got {pattern!r}")
    for module, value in pattern.items():
        if value != global_value:
            raise AdapterRejected(
                f"{CONFIG_FILE}: {option}: {module!r} -> {value!r} gives modules different "
                f"{what} (expected {global_value!r} or no {option}); not supported"
            )


def _module_patterns(config: dict, option: str, *, required: bool) -> list[str] | str | None:
    value = config.get(option)
    if value is None and not required:
        return None
    if isinstance(value, str):
        if len(value) > MAX_REGEX_CHARS or NESTED_QUANTIFIER.search(value):
            raise AdapterRejected(
                f"{CONFIG_FILE}: {option}: regex {value[:80]!r} is longer than "
                f"{MAX_REGEX_CHARS} characters or nests quantifiers; not accepted"
            )
        try:
            re.compile(value)
        except re.error as e:
            raise AdapterRejected(
                f"{CONFIG_FILE}: {option}: invalid regex {value!r}: {e}"
            ) from None
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    if not required and value == []:
        return None
    raise AdapterRejected(
        f"{CONFIG_FILE}: {option}: expected a non-empty list of module names or a regex, "
        f"got {value!r}"
    )


def _matches(module: str, patterns: list[str] | str | None) -> bool:
    """PEFT's rule: a regex must match the whole path; a name matches itself or a path suffix
    at a '.' boundary. `all-linear` matches every linear module except the output head."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        if patterns == "all-linear":
            return module.rsplit(".", 1)[-1] != "lm_head"
        return re.fullmatch(patterns, module) is not None
    return any(module == p or module.endswith("." + p) for p in patterns)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# adapter_model.safetensors
# ---------------------------------------------------------------------------------------------


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
    """tensor name -> (dtype, shape, absolute byte range), from the header only.

    safetensors itself checks the header's structure (offsets inside the file, contiguous, no
    overlap); the byte ranges come from our own parse of the same header, for the memory map.
    """
    try:
        with safe_open(str(path), framework="numpy") as f:
            names = set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterRejected(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from None
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        raw = json.loads(f.read(header_len))
    data_start = 8 + header_len
    header = {}
    for name in sorted(names):
        info = raw[name]
        begin, end = info["data_offsets"]
        header[name] = (info["dtype"], tuple(info["shape"]), (data_start + begin, data_start + end))
    if not header:
        raise AdapterRejected(f"{WEIGHTS_FILE} holds no tensors")
    return header


def _check_tensors(header, targets: LoraTargets, rank: int, patterns, excluded):
    """Every tensor is one side of a LoRA pair on a targeted base module, with the right shape
    and a float dtype. Returns (adapted modules, modules whose shapes could not be checked)."""
    sides: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, (dtype, shape, _) in header.items():
        match = TENSOR_NAME.fullmatch(name)
        if match is None:
            raise AdapterRejected(
                f"{WEIGHTS_FILE}: tensor {name!r}: expected a name of the form "
                "base_model.model.<module>.lora_A.weight or .lora_B.weight"
            )
        if dtype not in FLOAT_DTYPES:
            raise AdapterRejected(
                f"{WEIGHTS_FILE}: tensor {name!r}: dtype {dtype} is not one of "
                f"{', '.join(FLOAT_DTYPES)}"
            )
        module, side = match["module"], match["side"]
        sides.setdefault(module, {})[side] = shape

    unchecked: set[str] = set()
    fused_shapes: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...], str]] = {}
    for module, pair in sides.items():
        for side, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if side in pair and other not in pair:
                raise AdapterRejected(
                    f"{WEIGHTS_FILE}: module {module!r} has {side} but no {other}"
                )
        fused = targets.fused_expert_of(module)
        if module not in targets.shapes and fused is None:
            raise AdapterRejected(
                f"{WEIGHTS_FILE}: module {module!r} does not exist in the base model "
                "(or is not a LoRA-able linear module)"
            )
        if not _matches(module, patterns) or _matches(module, excluded):
            raise AdapterRejected(
                f"{WEIGHTS_FILE}: module {module!r} is not matched by "
                f"{CONFIG_FILE} target_modules {patterns!r}"
                + (f" (exclude_modules {excluded!r})" if excluded else "")
            )
        a, b = pair["lora_A"], pair["lora_B"]
        if fused is None:
            out_features, in_features = targets.shapes[module]
            _expect_shape(module, "lora_A", a, (rank, in_features))
            _expect_shape(module, "lora_B", b, (out_features, rank))
        else:
            experts, index, projection = fused
            if index >= targets.fused_experts[experts]:
                raise AdapterRejected(
                    f"{WEIGHTS_FILE}: module {module!r}: expert {index} does not exist "
                    f"(the base model has {targets.fused_experts[experts]} experts there)"
                )
            if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
                raise AdapterRejected(
                    f"{WEIGHTS_FILE}: module {module!r}: expected lora_A [{rank}, in] and "
                    f"lora_B [out, {rank}], got {list(a)} and {list(b)}"
                )
            first = fused_shapes.setdefault((experts, projection), (a, b, module))
            if (first[0], first[1]) != (a, b):
                raise AdapterRejected(
                    f"{WEIGHTS_FILE}: module {module!r}: lora_A/lora_B shapes {a}/{b} differ "
                    f"from {first[2]!r}'s {first[0]}/{first[1]}"
                )
            unchecked.add(module)
    return set(sides), unchecked


def _expect_shape(module: str, side: str, got: tuple[int, ...], expected: tuple[int, int]):
    if tuple(got) != expected:
        raise AdapterRejected(
            f"{WEIGHTS_FILE}: tensor 'base_model.model.{module}.{side}.weight': "
            f"expected shape {list(expected)}, got {list(got)}"
        )


def _check_finite(path: Path, header) -> None:
    """Reject any NaN or infinity, reading the raw bits (works for bf16 without torch)."""
    if all(begin == end for _, _, (begin, end) in header.values()):
        return  # nothing to map (mmap refuses an empty file region)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for name, (dtype, _, byte_range) in header.items():
            index = _first_non_finite(data, dtype, byte_range)
            if index is not None:
                raise AdapterRejected(
                    f"{WEIGHTS_FILE}: tensor {name!r} has non-finite values (NaN or infinity), "
                    f"first at flat index {index}"
                )


def _first_non_finite(data: mmap.mmap, dtype: str, byte_range: tuple[int, int]) -> int | None:
    # Kept apart so that no array view of the map outlives this call (the map must close).
    bits, exponent_mask = FLOAT_DTYPES[dtype]
    begin, end = byte_range
    values = np.frombuffer(
        data, dtype=bits, count=(end - begin) // DTYPE_BYTES[dtype], offset=begin
    )
    mask = bits(exponent_mask)
    for start in range(0, values.size, _FINITE_CHECK_CHUNK):
        bad = np.flatnonzero((values[start : start + _FINITE_CHECK_CHUNK] & mask) == mask)
        if bad.size:
            return start + int(bad[0])
    return None
