"""Quantized checkpoints: :func:`save_quantized` and :func:`load_quantized`.

Format (``format_version`` 1), a Hugging Face model directory:

* Tensors in ``model.safetensors``, or in shards ``model-00001-of-0000N.safetensors`` listed by
  ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {key: file}}``).
* The keys are ``model.state_dict()``'s, tied duplicates dropped (``lm_head.weight`` when tied to the
  embeddings): a QuantLinear ``<name>`` stores ``<name>.packed_0``.., ``.scales``, ``.zeros``
  (asymmetric schemes), ``.perm`` (act-order) and ``.bias`` in the layout of :mod:`lowbit.pack`
  (2:4 sparse schemes: the compressed codes of :mod:`lowbit.sparsity`); every other tensor as the
  model holds it. A Hugging Face quantizer that swaps ``nn.Linear`` for QuantLinear before loading
  reads the files without any key conversion.
* Each shard's header metadata holds ``"format": "pt"`` and, for every tensor in that shard,
  ``"lowbit.sha256.<key>"``: the SHA-256 (lowercase hex) of the tensor's raw little-endian bytes.
* ``config.json``: the model's config (Hugging Face models; nothing else for a plain nn.Module) plus
  ``quantization_config = {"quant_method": "lowbit", "format_version": 1, "layout": <pack layout>,
  "scheme": <most common scheme>, "modules": {name: {"scheme", "shape": [out, in], "dtype",
  "act_order"}}, "modules_to_not_convert": [names of nn.Linear left unquantized]}``.

Loading reads only JSON and safetensors (nothing is unpickled) and checks every header, key, dtype
and shape before building the model, then the act-order permutations and 2:4 positions it read;
any defect raises :class:`CheckpointError` naming the file and the tensor or field, and no
half-built model is returned (a ``model=`` skeleton gets its original modules back). Unquantized
floating tensors keep the floating dtype they were stored in.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from .. import pack as _pack
from .. import sparsity as _sparsity
from ..nn import QuantLinear, check_unfused
from ..qweight import QuantizedWeight
from ..scheme import Scheme

__all__ = ["CheckpointError", "save_quantized", "load_quantized", "FORMAT_VERSION"]

FORMAT_VERSION = 1
QUANT_METHOD = "lowbit"
CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHA256_PREFIX = "lowbit.sha256."

_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
    "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_WEIGHT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or inconsistent; the message names the file and tensor or field."""


# -- shared by save and load ---------------------------------------------------------------------

def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's raw bytes (the bytes safetensors stores)."""
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _alias_key(t: torch.Tensor):
    """Equal keys mean the same data (tied weights): the same tensor object, or the same view of one storage."""
    if t.device.type == "meta" or t.numel() == 0:
        return id(t)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _alias_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """State-dict keys grouped by shared data, in state-dict order."""
    groups: dict = {}
    for name, t in state.items():
        groups.setdefault(_alias_key(t), []).append(name)
    return list(groups.values())


def _set_attr(model: nn.Module, dotted_name: str, value) -> None:
    """Set a submodule, parameter or buffer by its qualified name."""
    parent, _, child = dotted_name.rpartition(".")
    setattr(model.get_submodule(parent), child, value)


# -- save ----------------------------------------------------------------------------------------

def save_quantized(model: nn.Module, dir, max_shard_size: int | str = "2GB", overwrite: bool = False) -> Path:
    """Write ``model`` (after :func:`lowbit.quantize_model`) to ``dir`` in the format of this module.

    ``max_shard_size``: bytes, or a string like ``"2GB"``/``"500MiB"``; a tensor larger than it gets
    a shard of its own. Everything is written to a temporary directory next to ``dir`` and renamed
    into place, so a failure leaves no partial checkpoint (and an overwritten one intact).
    A ``dir`` that exists and is not empty is refused unless ``overwrite=True``.
    """
    check_unfused(model)
    target = Path(dir).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    quantization_config = _quantization_config(model)
    shards = _split_shards(_unique_state_dict(model), _parse_size(max_shard_size))
    config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    if config and not config.get("architectures"):  # as save_pretrained does, e.g. for a model loaded from GGUF
        config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quantization_config

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.lowbit-tmp-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        _write_checkpoint(staging, shards, config)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _quantization_config(model: nn.Module) -> dict:
    modules = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if not name:
            raise ValueError("save_quantized needs the QuantLinear inside a module (its keys need a name)")
        meta = m.qweight.meta()  # builds and validates the layer's QuantizedWeight
        modules[name] = {"scheme": meta["scheme"], "shape": meta["shape"], "dtype": meta["dtype"],
                         "act_order": m.perm is not None}
    if not modules:
        raise ValueError("the model has no QuantLinear module: quantize it first (lowbit.quantize_model)")
    most_common = collections.Counter(e["scheme"] for e in modules.values()).most_common(1)[0][0]
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layout": _pack.LAYOUT,
            "scheme": most_common, "modules": modules,
            "modules_to_not_convert": [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]}


def _tied_keys(model: nn.Module) -> set[str]:
    """Keys Hugging Face declares as tied copies (dict target -> source in v5, a list before)."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ()
    return {k for k in tied if isinstance(k, str)}


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each tied group stored once (like Hugging Face: a non-tied name is kept)."""
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device: load the model's weights before saving")
    tied = _tied_keys(model)
    kept = {sorted(names, key=lambda n: n in tied)[0] for names in _alias_groups(state)}
    unique, storages = {}, set()
    for name, t in state.items():
        if name not in kept:
            continue
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        if t.numel() and storage in storages:  # a distinct view of a shared storage: safetensors stores no views
            t = t.clone()
        storages.add(storage)
        unique[name] = t
    return unique


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
        if not m:
            raise ValueError(f"max_shard_size must be bytes or a string like '2GB' or '500MiB', got {size!r}")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


def _write_checkpoint(root: Path, shards: list[dict[str, torch.Tensor]], config: dict) -> None:
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        cpu = {k: t.to("cpu").contiguous() for k, t in shard.items()}
        metadata = {"format": "pt", **{SHA256_PREFIX + k: tensor_sha256(t) for k, t in cpu.items()}}
        safetensors.torch.save_file(cpu, root / file_name, metadata=metadata)
        weight_map.update(dict.fromkeys(cpu, file_name))
        total += sum(t.numel() * t.element_size() for t in cpu.values())
    if len(shards) > 1:
        _write_json(root / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(root / CONFIG_NAME, config)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _move_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    old = target.with_name(f".{target.name}.lowbit-old-{uuid.uuid4().hex[:12]}")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


# -- load: files ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _StoredTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    sha256: str


def _reject_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key(s) {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _parse_json(raw: bytes, path: Path, what: str):
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: {what} is not valid JSON: {e}") from None


def _read_json_object(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    obj = _parse_json(raw, path, "the file")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_header(path: Path) -> dict[str, _StoredTensor]:
    """Parse and check a safetensors header as strictly as safetensors itself, so it never sees a bad file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes, not even the 8-byte header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: truncated or corrupt: header length {header_len} "
                                      f"for a file of {size} bytes")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: the header does not start with '{{'")
    header = _parse_json(raw, path, "the header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: header field '__metadata__' must map strings to strings")
    if metadata.get("format") != "pt":
        raise CheckpointError(f"{path}: header metadata 'format' is {metadata.get('format')!r}, expected 'pt'")

    stored, spans = {}, []
    for key, entry in header.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: header entry must have exactly dtype, shape and data_offsets")
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(f"{where}: unsupported dtype {entry['dtype']!r}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
                and math.prod(max(d, 1) for d in shape) < 2**63):  # strides, even of an empty tensor, are int64
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers whose product fits "
                                  f"in int64, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
                                  f"but {entry['dtype']} {shape} needs {nbytes}")
        digest = metadata.get(SHA256_PREFIX + key)
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise CheckpointError(f"{where}: header metadata has no valid '{SHA256_PREFIX}{key}' (SHA-256 hex)")
        stored[key] = _StoredTensor(path, dtype, tuple(shape), digest)
        spans.append((offsets[0], offsets[1], key))

    end, data_size = 0, size - 8 - header_len
    for begin, stop, key in sorted(spans):
        if begin != end:
            problem = "overlap" if begin < end else "leave a gap after"
            raise CheckpointError(f"{path}: tensor {key!r}: data_offsets [{begin}, {stop}] {problem} "
                                  f"the previous tensor (ending at {end})")
        end = stop
    if end != data_size:
        raise CheckpointError(f"{path}: truncated or corrupt: the tensors cover {end} bytes of data, "
                              f"the file holds {data_size}")
    return stored


def _shard_files(root: Path) -> tuple[list[str], dict[str, str] | None]:
    """The shard file names, and the index's key -> file map (None for a single file)."""
    single, index = root / SINGLE_FILE, root / INDEX_NAME
    if single.exists() and index.exists():
        raise CheckpointError(f"{root}: both {SINGLE_FILE} and {INDEX_NAME} are present; expected one")
    if not index.exists():
        if not single.exists():
            raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_NAME}")
        return [SINGLE_FILE], None
    weight_map = _read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> file")
    for key, file_name in weight_map.items():
        if not (isinstance(file_name, str) and re.fullmatch(r"[^/\\]+\.safetensors", file_name)
                and not file_name.startswith(".")):
            raise CheckpointError(f"{index}: weight_map[{key!r}] must name a .safetensors file in the directory, "
                                  f"got {file_name!r}")
    files = sorted(set(weight_map.values()))
    for file_name in files:
        if not (root / file_name).is_file():
            raise CheckpointError(f"{index}: shard {file_name!r} does not exist")
    return files, weight_map


def _stored_tensors(root: Path) -> dict[str, _StoredTensor]:
    files, weight_map = _shard_files(root)
    stored: dict[str, _StoredTensor] = {}
    for file_name in files:
        for key, info in _read_header(root / file_name).items():
            if key in stored:
                raise CheckpointError(f"{info.file}: tensor {key!r} is also stored in {stored[key].file.name}")
            if weight_map is not None and weight_map.get(key) != file_name:
                raise CheckpointError(f"{info.file}: tensor {key!r} is not mapped to this file by {INDEX_NAME}")
            stored[key] = info
    for key, file_name in (weight_map or {}).items():
        if key not in stored:
            raise CheckpointError(f"{root / file_name}: tensor {key!r}, listed in {INDEX_NAME}, is not in this file")
    return stored


# -- load: config ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _LayerSpec:
    scheme: Scheme
    shape: tuple[int, int]
    dtype: torch.dtype
    act_order: bool

    def meta(self) -> dict:
        """The dict :meth:`QuantizedWeight.from_tensors` takes."""
        return {"scheme": str(self.scheme), "shape": list(self.shape),
                "dtype": str(self.dtype).removeprefix("torch."), "layout": _pack.LAYOUT}


def _parse_scheme(text, where: str) -> Scheme:
    try:
        return Scheme.parse(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _quantized_layers(config: dict, path: Path) -> dict[str, _LayerSpec]:
    q = config.get("quantization_config")
    where = f"{path}: quantization_config"
    if not isinstance(q, dict):
        raise CheckpointError(f"{where} is missing or not an object")
    if q.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}.quant_method is {q.get('quant_method')!r}, expected {QUANT_METHOD!r}")
    if not _is_int(q.get("format_version")) or q["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{where}.format_version is {q.get('format_version')!r}; "
                              f"this lowbit reads version {FORMAT_VERSION}")
    if q.get("layout") != _pack.LAYOUT:
        raise CheckpointError(f"{where}.layout is {q.get('layout')!r}, expected {_pack.LAYOUT!r}")
    _parse_scheme(q.get("scheme"), f"{where}.scheme")
    not_converted = q.get("modules_to_not_convert")
    if not isinstance(not_converted, list) or not all(isinstance(n, str) for n in not_converted):
        raise CheckpointError(f"{where}.modules_to_not_convert must be a list of module names")
    modules = q.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{where}.modules must be a non-empty object of module name -> layer")
    layers = {}
    for name, entry in modules.items():
        at = f"{where}.modules[{name!r}]"
        if not name:
            raise CheckpointError(f"{at}: a module name must not be empty")
        if not isinstance(entry, dict):
            raise CheckpointError(f"{at} must be an object with scheme, shape, dtype and act_order")
        scheme = _parse_scheme(entry.get("scheme"), f"{at}.scheme")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
            raise CheckpointError(f"{at}.shape must be [out_features, in_features] (positive integers), got {shape!r}")
        dtype = _WEIGHT_DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
        if dtype is None:
            raise CheckpointError(f"{at}.dtype must be one of {sorted(_WEIGHT_DTYPES)}, got {entry.get('dtype')!r}")
        if not isinstance(entry.get("act_order"), bool):
            raise CheckpointError(f"{at}.act_order must be true or false, got {entry.get('act_order')!r}")
        layers[name] = _LayerSpec(scheme, (shape[0], shape[1]), dtype, entry["act_order"])
    return layers


def _build_hf_model(config: dict, path: Path) -> nn.Module:
    if not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{path}: no 'model_type', so no Hugging Face architecture to build; "
                              "pass model=<the module's skeleton>")
    import transformers
    from accelerate import init_empty_weights

    hf_fields = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        hf_config = transformers.AutoConfig.for_model(**hf_fields)
        with init_empty_weights(include_buffers=False):  # parameters on meta; small buffers (RoPE) computed
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
        model.tie_weights()  # meta init unties shared parameters; tied keys are recognised by identity
    except Exception as e:  # transformers raises many types on a bad config
        raise CheckpointError(f"{path}: cannot build the {config['model_type']!r} model from this config: "
                              f"{type(e).__name__}: {e}") from None
    return model


# -- load: model -----------------------------------------------------------------------------------

def _empty_quant_linears(model: nn.Module, layers: dict[str, _LayerSpec], path: Path) -> dict[str, QuantLinear]:
    """An empty (meta) QuantLinear for each listed layer, once the model is known to hold an nn.Linear of
    that shape there (checked for all layers before any is swapped in)."""
    replacements = {}
    for name, spec in layers.items():
        at = f"{path}: quantization_config.modules[{name!r}]"
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{at}: the model has no module {name!r}") from None
        if not isinstance(linear, (nn.Linear, QuantLinear)):
            raise CheckpointError(f"{at}: the model's module is a {type(linear).__name__}, not an nn.Linear")
        if (linear.out_features, linear.in_features) != spec.shape:
            raise CheckpointError(f"{at}.shape is {list(spec.shape)} but the model's layer is "
                                  f"[{linear.out_features}, {linear.in_features}]")
        replacements[name] = QuantLinear(spec.shape[1], spec.shape[0], spec.scheme, bias=linear.bias is not None,
                                         dtype=spec.dtype, device="meta", act_order=spec.act_order)
    return replacements


def _weight_keys(name: str, keys) -> dict[str, str]:
    """Checkpoint key -> QuantizedWeight tensor name, of the QuantLinear ``name`` (all its keys but the bias)."""
    prefix = name + "."
    return {k: k[len(prefix):] for k in keys
            if k.startswith(prefix) and "." not in k[len(prefix):] and k != prefix + "bias"}


def _check_layer(name: str, spec: _LayerSpec, stored: dict[str, _StoredTensor], root: Path) -> None:
    """QuantizedWeight's own validation of one layer's stored tensors (as meta tensors: no data read yet)."""
    keys = _weight_keys(name, stored)
    files = ", ".join(sorted({str(stored[k].file) for k in keys})) or str(root)
    try:
        tensors = {t: torch.empty(stored[k].shape, dtype=stored[k].dtype, device="meta") for k, t in keys.items()}
        QuantizedWeight.from_tensors(tensors, spec.meta())
    except ValueError as e:
        raise CheckpointError(f"{files}: module {name!r}: {e}") from None


def _match_state(model: nn.Module, stored: dict[str, _StoredTensor], quantized_prefixes: tuple[str, ...],
                 root: Path) -> dict[str, str]:
    """Check stored keys, dtypes and shapes against the model's state dict; return tied key -> stored key.

    QuantLinear tensors must have exactly their dtype; other floating tensors may be stored in any
    floating dtype (the model keeps the stored one, as Hugging Face's ``dtype="auto"``).
    """
    state = model.state_dict(keep_vars=True)
    aliases, expected = {}, {}
    for names in _alias_groups(state):
        present = [n for n in names if n in stored]
        if not present:
            raise CheckpointError(f"{root}: tensor {names[0]!r} is missing"
                                  + (f" (nor is any tensor tied to it: {names[1:]})" if len(names) > 1 else ""))
        if len(present) > 1:
            raise CheckpointError(f"{stored[present[1]].file}: tensors {present} are tied; only one may be stored")
        expected[present[0]] = state[present[0]]
        aliases.update({n: present[0] for n in names if n != present[0]})
    for key, info in stored.items():
        if key not in expected:
            raise CheckpointError(f"{info.file}: unexpected tensor {key!r} (the model has no such parameter or buffer)")
        want = expected[key]
        any_float = (want.dtype.is_floating_point and info.dtype.is_floating_point
                     and not key.startswith(quantized_prefixes))
        if info.shape != tuple(want.shape) or not (info.dtype == want.dtype or any_float):
            raise CheckpointError(f"{info.file}: tensor {key!r}: expected {want.dtype} {tuple(want.shape)}, "
                                  f"got {info.dtype} {info.shape}")
    persistent = set(state)
    for name, buffer in model.named_buffers():
        if name not in persistent and buffer.device.type == "meta":
            raise CheckpointError(f"{root}: buffer {name!r} is not stored (non-persistent) and the model holds it "
                                  "on the meta device; pass a skeleton whose non-persistent buffers are real")
    return aliases


def _read_tensors(stored: dict[str, _StoredTensor], verify: bool) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for key, info in stored.items():
        by_file.setdefault(info.file, []).append(key)
    tensors = {}
    for path, keys in by_file.items():
        try:
            with safetensors.safe_open(path, framework="pt", device="cpu") as f:
                for key in keys:
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # SafetensorError, OSError: the file changed under us
            raise CheckpointError(f"{path}: cannot read tensors: {e}") from None
        if verify:
            for key in keys:
                digest = tensor_sha256(tensors[key])
                if digest != stored[key].sha256:
                    raise CheckpointError(f"{path}: tensor {key!r}: SHA-256 {digest[:16]}... does not match the "
                                          f"stored {stored[key].sha256[:16]}...: the data is corrupt")
    return tensors


def _check_perms(layers: dict[str, _LayerSpec], tensors: dict[str, torch.Tensor], stored) -> None:
    """A corrupt act-order permutation would index out of range in the matmul: reject it here."""
    for name, spec in layers.items():
        if spec.act_order:
            perm = tensors[name + ".perm"]
            if not torch.equal(perm.sort().values, torch.arange(spec.shape[1])):
                raise CheckpointError(f"{stored[name + '.perm'].file}: tensor {name + '.perm'!r} is not a "
                                      f"permutation of 0..{spec.shape[1] - 1}")


def _check_sparse_positions(layers: dict[str, _LayerSpec], tensors: dict[str, torch.Tensor], stored) -> None:
    """Two kept entries of a group at one position would make the kernel and the reference disagree: reject them."""
    for name, spec in layers.items():
        if spec.scheme.sparsity:
            keys = _weight_keys(name, tensors)
            qw = QuantizedWeight.from_tensors({t: tensors[k] for k, t in keys.items()}, spec.meta())
            try:
                _sparsity.check_positions(_sparsity.split_codes(qw.codes())[1])
            except ValueError as e:
                raise CheckpointError(f"{stored[name + '.packed_0'].file}: module {name!r}: {e}") from None


def _import_foreign(root: Path, dtype: torch.dtype | None) -> nn.Module | None:
    """The model of a GPTQ/AWQ/compressed-tensors directory (repacked, not re-quantized), else None."""
    from .importers import detect_format, load_foreign

    try:
        if detect_format(root) is None:
            return None
        return load_foreign(root, **({} if dtype is None else {"dtype": dtype}))
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{root}: {err}") from err


def load_quantized(dir, model: nn.Module | None = None, verify: bool = False, device="cpu",
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`, without re-quantizing.

    ``model=None`` builds the Hugging Face architecture named by ``config.json`` (parameters on the meta
    device, then the stored tensors assigned); otherwise ``model`` is a skeleton (an instance of the
    saved module's class, weights irrelevant) whose listed ``nn.Linear`` become QuantLinear in place.
    ``verify=True`` also checks every tensor's SHA-256. A GPTQ, AWQ or compressed-tensors directory is
    imported instead (:func:`lowbit.io.importers.load_foreign`). ``dtype`` casts the unquantized floating tensors
    (embeddings, norms, unquantized linears); quantized layers keep their stored tensors.
    Returns the model on ``device`` in eval mode; raises :class:`CheckpointError` on any defect.
    """
    root = Path(dir)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    config_path = root / CONFIG_NAME
    config = _read_json_object(config_path)
    quant = config.get("quantization_config")
    if quant is None or (isinstance(quant, dict) and quant.get("quant_method") != "lowbit"):
        foreign = _import_foreign(root, dtype)
        if foreign is not None:
            return foreign.to(device).eval()
    layers = _quantized_layers(config, config_path)
    stored = _stored_tensors(root)
    for name, spec in layers.items():
        _check_layer(name, spec, stored, root)

    skeleton = _build_hf_model(config, config_path) if model is None else model
    replacements = _empty_quant_linears(skeleton, layers, config_path)
    originals = {name: skeleton.get_submodule(name) for name in replacements}
    try:
        for name, quant in replacements.items():
            _set_attr(skeleton, name, quant)
        quantized_prefixes = tuple(name + "." for name in layers)
        aliases = _match_state(skeleton, stored, quantized_prefixes, root)
        tensors = _read_tensors(stored, verify)
        _check_perms(layers, tensors, stored)
        _check_sparse_positions(layers, tensors, stored)
        if dtype is not None:
            tensors = {k: t.to(dtype) if t.is_floating_point() and not k.startswith(quantized_prefixes) else t
                       for k, t in tensors.items()}
        state = {**tensors, **{alias: tensors[key] for alias, key in aliases.items()}}
        try:
            skeleton.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"{root}: the model rejected the checkpoint's tensors: {e}") from None
    except BaseException:
        for name, original in originals.items():  # give a caller's skeleton its modules back
            _set_attr(skeleton, name, original)
        raise
    # assign=True wrapped each tied key in its own Parameter: make them one object again.
    loaded = skeleton.state_dict(keep_vars=True)
    for alias, key in aliases.items():
        _set_attr(skeleton, alias, loaded[key])
    return skeleton.to(device).eval()
