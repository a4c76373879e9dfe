"""Corrupt freshly saved checkpoints in many ways; every load must end in a CheckpointError, fast.

Two pristine checkpoints: ``llama`` (tiny Hugging Face LLaMA, float16, int4-g32-asym, one file, loaded
with ``model=None``) and ``mlp`` (a plain module with act-order, 3-bit, fp6 and unquantized layers,
sharded with an index, loaded into a skeleton that must get its modules back). Each case applies one
corruption, chosen by a ``random.Random`` seeded with the case id, so every run is the same.
"""

import json
import random
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import safetensors
import safetensors.torch
import torch

import lowbit
from lowbit import QuantLinear
from lowbit.io.checkpoint import (CONFIG_NAME, INDEX_NAME, SHA256_PREFIX, SINGLE_FILE, CheckpointError,
                                  load_quantized, save_quantized, tensor_sha256)
from test_checkpoint import mlp_skeleton, quantized_mlp, tiny_llama

CASE_TIME_LIMIT_S = 5.0
DELETE = object()  # marks a field to remove rather than set


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    torch.manual_seed(1234)
    root = tmp_path_factory.mktemp("pristine")
    save_quantized(lowbit.quantize_model(tiny_llama(torch.float16), "int4-g32-asym", progress=False), root / "llama")
    save_quantized(quantized_mlp(), root / "mlp", max_shard_size=8000)
    return root


def load(ckpt, base, verify):
    return load_quantized(ckpt, model=mlp_skeleton() if base == "mlp" else None, verify=verify)


# -- file helpers ----------------------------------------------------------------------------------

def shards(ckpt):
    return sorted(ckpt.glob("*.safetensors"))


def read_safetensors(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path, header, data: bytes, header_text: bytes | None = None):
    text = header_text if header_text is not None else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def tensor_names(header):
    return [k for k in header if k != "__metadata__"]


def fullest_shard(ckpt):
    return max(shards(ckpt), key=lambda p: len(read_safetensors(p)[0]))


# -- corruption families ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    base: str
    mutate: Callable  # (checkpoint dir, random.Random) -> None
    verify: bool = False


def truncate_at(choose_offset):
    def mutate(ckpt, rng):
        path = rng.choice(shards(ckpt))
        raw = path.read_bytes()
        header_end = 8 + int.from_bytes(raw[:8], "little")
        path.write_bytes(raw[:choose_offset(rng, header_end, len(raw))])
    return mutate


def truncate_json(name, fraction):
    def mutate(ckpt, rng):
        path = ckpt / name
        raw = path.read_bytes()
        path.write_bytes(raw[:int(len(raw) * fraction)])
    return mutate


def set_header_length(choose):
    def mutate(ckpt, rng):
        path = rng.choice(shards(ckpt))
        raw = path.read_bytes()
        value = choose(rng, int.from_bytes(raw[:8], "little"), len(raw))
        path.write_bytes((value % 2**64).to_bytes(8, "little") + raw[8:])
    return mutate


def random_header_bytes(count):
    """Replace ``count`` bytes of the header's JSON text (not its trailing padding) by other bytes."""
    def mutate(ckpt, rng):
        path = rng.choice(shards(ckpt))
        raw = bytearray(path.read_bytes())
        text_end = 8 + len(raw[8:8 + int.from_bytes(raw[:8], "little")].rstrip(b" "))
        for pos in rng.sample(range(8, text_end), count):
            raw[pos] = rng.choice([b for b in range(256) if b != raw[pos]])
        path.write_bytes(bytes(raw))
    return mutate


def header_edit(edit):
    """``edit(header, data, rng)`` changes the parsed header of the shard holding the most tensors."""
    def mutate(ckpt, rng):
        path = fullest_shard(ckpt)
        header, data = read_safetensors(path)
        edit(header, data, rng)
        write_safetensors(path, header, data)
    return mutate


def header_text(make):
    """Replace the header by raw text ``make(header)`` (for JSON that json.dumps cannot produce)."""
    def mutate(ckpt, rng):
        path = fullest_shard(ckpt)
        header, data = read_safetensors(path)
        write_safetensors(path, None, data, make(header))
    return mutate


def pick(header, rng, predicate=lambda entry: True):
    return rng.choice([k for k in tensor_names(header) if predicate(header[k])])


def set_dtype(value):
    def edit(header, data, rng):
        header[pick(header, rng)]["dtype"] = value
    return edit


SAME_SIZE_OTHER_KIND = {"F32": "I32", "I32": "F32", "F16": "I16", "BF16": "I16", "I16": "BF16", "U8": "I8",
                        "I8": "U8", "I64": "F64", "F64": "I64"}


def reinterpret_dtype(header, data, rng):
    key = pick(header, rng, lambda e: e["dtype"] in SAME_SIZE_OTHER_KIND)
    header[key]["dtype"] = SAME_SIZE_OTHER_KIND[header[key]["dtype"]]


def resize_dtype(header, data, rng):
    key = pick(header, rng)
    header[key]["dtype"] = "F64" if header[key]["dtype"] in ("F16", "BF16", "I16", "I8", "U8") else "I8"


def set_shape(transform, predicate=lambda shape: True):
    def edit(header, data, rng):
        key = pick(header, rng, lambda e: predicate(e["shape"]))
        header[key]["shape"] = transform(header[key]["shape"])
    return edit


def set_offsets(transform, predicate=lambda begin, end: True):
    def edit(header, data, rng):
        key = pick(header, rng, lambda e: predicate(*e["data_offsets"]))
        header[key]["data_offsets"] = transform(*header[key]["data_offsets"])
    return edit


def swap_offsets(same_size):
    """Exchange two tensors' data_offsets: a size mismatch, or (same dtype and shape, different bytes) a
    valid header that only the hashes can tell from the original."""
    def edit(header, data, rng):
        def payload(k):
            return data[slice(*header[k]["data_offsets"])]

        def swappable(a, b):
            if not same_size:
                return len(payload(a)) != len(payload(b))
            same_layout = all(header[a][f] == header[b][f] for f in ("dtype", "shape"))
            return same_layout and payload(a) != payload(b)

        names = tensor_names(header)
        a, b = rng.choice([(a, b) for a in names for b in names if a < b and swappable(a, b)])
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    return edit


def drop_entry(header, data, rng):
    del header[pick(header, rng)]


def duplicate_entry(header, data, rng):
    key = pick(header, rng, lambda e: e["data_offsets"][1] > e["data_offsets"][0])
    header[key + ".copy"] = dict(header[key])
    header["__metadata__"][SHA256_PREFIX + key + ".copy"] = header["__metadata__"][SHA256_PREFIX + key]


def edit_metadata(change):
    def edit(header, data, rng):
        change(header, rng)
    return edit


def set_hash(make):
    def change(header, rng):
        name = SHA256_PREFIX + pick(header, rng)
        if make is DELETE:
            del header["__metadata__"][name]
        else:
            header["__metadata__"][name] = make(header["__metadata__"][name], header)
    return change


def add_empty_entry(shape):
    """A zero-byte tensor in a quantized layer, so the data offsets stay consistent."""
    def edit(header, data, rng):
        key = pick(header, rng).rsplit(".", 1)[0] + ".extra"
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [0, 0]}
        header["__metadata__"][SHA256_PREFIX + key] = tensor_sha256(torch.empty(0))
    return edit


def config_edit(change):
    def mutate(ckpt, rng):
        path = ckpt / CONFIG_NAME
        config = json.loads(path.read_text())
        path.write_text(json.dumps(change(config, rng)))
    return mutate


def quant_field(name, value):
    def change(config, rng):
        if value is DELETE:
            del config["quantization_config"][name]
        else:
            config["quantization_config"][name] = value
        return config
    return change



def any_entry(entry):
    return True


def module_field(name, transform, predicate=any_entry):
    """``transform(entry value)`` for one module of the quantization config (chosen among ``predicate``)."""
    def change(config, rng):
        modules = config["quantization_config"]["modules"]
        entry = modules[rng.choice(sorted(m for m in modules if predicate(modules[m])))]
        if transform is DELETE:
            del entry[name]
        else:
            entry[name] = transform(entry[name])
        return config
    return change


def other_segments(scheme):
    """Same scheme with a format whose packed segments differ (4 -> 6 bits, 3 -> 4, 6 -> 8)."""
    fmt, rest = scheme.split("-", 1)
    return {"int4": "int6", "int3": "int4", "fp6_e3m2": "fp8_e4m3"}[fmt] + "-" + rest


def other_groups(scheme):
    return scheme.replace("-g32", "-g16") if "-g32" in scheme else scheme.replace("-channel", "-g32")


def toggle_asym(scheme):
    return scheme.replace("-asym", "") if "-asym" in scheme else scheme + "-asym"


def hf_field(name, value):
    def change(config, rng):
        if value is DELETE:
            del config[name]
        else:
            config[name] = value
        return config
    return change


def modules_edit(change):
    def edit(config, rng):
        change(config["quantization_config"]["modules"], config, rng)
        return config
    return edit


def add_module(name_of):
    def change(modules, config, rng):
        modules[name_of(config)] = dict(next(iter(modules.values())))
    return change


def remove_module(modules, config, rng):
    del modules[rng.choice(sorted(modules))]


def rename_module(modules, config, rng):
    name = rng.choice(sorted(modules))
    modules[name + "_renamed"] = modules.pop(name)


def write_file(name, content: bytes):
    def mutate(ckpt, rng):
        (ckpt / name).write_bytes(content)
    return mutate


def delete_file(name_of):
    def mutate(ckpt, rng):
        (ckpt / name_of(ckpt, rng)).unlink()
    return mutate


def index_edit(change):
    def mutate(ckpt, rng):
        path = ckpt / INDEX_NAME
        index = json.loads(path.read_text())
        change(index, rng)
        path.write_text(json.dumps(index))
    return mutate


def remap(transform):
    def change(index, rng):
        key = rng.choice(sorted(index["weight_map"]))
        index["weight_map"][key] = transform(index["weight_map"][key], index)
    return change


def tensor_edit(predicate, transform, update_index=True):
    """Rewrite, with safetensors and valid hashes, the shard of a tensor chosen among ``predicate(key, t)``."""
    def mutate(ckpt, rng):
        candidates = []
        for path in shards(ckpt):
            tensors = safetensors.torch.load_file(path)
            candidates += [(path, k) for k, t in tensors.items() if predicate(k, t)]
        path, key = rng.choice(candidates)
        tensors = safetensors.torch.load_file(path)
        transform(tensors, key)
        metadata = {"format": "pt", **{SHA256_PREFIX + k: tensor_sha256(t) for k, t in tensors.items()}}
        safetensors.torch.save_file(tensors, path, metadata=metadata)
        index_path = ckpt / INDEX_NAME
        if update_index and index_path.exists():
            index = json.loads(index_path.read_text())
            kept = {k: f for k, f in index["weight_map"].items() if f != path.name}
            index["weight_map"] = {**kept, **dict.fromkeys(tensors, path.name)}
            index_path.write_text(json.dumps(index))
    return mutate


def replace_tensor(make):
    def transform(tensors, key):
        tensors[key] = make(tensors[key]).contiguous()
    return transform


def drop_tensor(tensors, key):
    del tensors[key]


def add_tensor(name_of):
    def transform(tensors, key):
        tensors[name_of(key)] = tensors[key].clone()
    return transform


def is_quantized(key, t):
    return key.rsplit(".", 1)[-1] in ("scales", "zeros", "perm") or ".packed_" in key


def flip_data_byte(ckpt, rng):
    path = rng.choice(shards(ckpt))
    raw = bytearray(path.read_bytes())
    pos = rng.randrange(8 + int.from_bytes(raw[:8], "little"), len(raw))
    raw[pos] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(raw))


# -- the cases -------------------------------------------------------------------------------------

def build_cases() -> list[Case]:
    cases = []

    def add(family, base, mutate, count=1, verify=False):
        for i in range(count):
            cases.append(Case(f"{base}-{family}-{i}" if count > 1 else f"{base}-{family}", base, mutate, verify))

    for base in ("llama", "mlp"):
        # Truncation: inside the length prefix, at and around the header's end, anywhere in the data.
        for name, offset in [("empty", lambda r, h, n: 0), ("1B", lambda r, h, n: 1), ("7B", lambda r, h, n: 7),
                             ("8B", lambda r, h, n: 8), ("in-header", lambda r, h, n: r.randrange(9, h)),
                             ("header-end-1", lambda r, h, n: h - 1), ("header-only", lambda r, h, n: h),
                             ("last-byte", lambda r, h, n: n - 1)]:
            add(f"truncate-{name}", base, truncate_at(offset))
        add("truncate-data", base, truncate_at(lambda r, h, n: r.randrange(h + 1, n - 1)), count=14)
        add("truncate-config", base, truncate_json(CONFIG_NAME, 0.5))
        add("truncate-config-1B", base, truncate_json(CONFIG_NAME, 0.0001))

        # The 8-byte header length.
        for name, value in [("zero", lambda r, h, n: 0), ("one", lambda r, h, n: 1), ("minus-1", lambda r, h, n: h - 1),
                            ("plus-1", lambda r, h, n: h + 1), ("plus-8", lambda r, h, n: h + 8),
                            ("file-size", lambda r, h, n: n), ("file-size-minus-8", lambda r, h, n: n - 8),
                            ("max-u64", lambda r, h, n: 2**64 - 1), ("2^63", lambda r, h, n: 2**63),
                            ("over-limit", lambda r, h, n: 100_000_001)]:
            add(f"header-length-{name}", base, set_header_length(value))
        add("header-length-random", base, set_header_length(lambda r, h, n: r.getrandbits(64)), count=5)

        # Random bytes in the JSON header (a changed hash digit is only caught by verify).
        add("header-byte", base, random_header_bytes(1), count=14, verify=True)
        add("header-3-bytes", base, random_header_bytes(3), count=6, verify=True)

        # Structured header edits.
        for value in ["F9", "", "f32", 5, None, ["F32"]]:
            add(f"dtype-{value!r}", base, header_edit(set_dtype(value)))
        add("dtype-reinterpret", base, header_edit(reinterpret_dtype), count=3)
        add("dtype-resize", base, header_edit(resize_dtype), count=2)
        for name, transform, predicate in [
                ("transposed", lambda s: s[::-1], lambda s: len(s) == 2 and s[0] != s[1]),
                ("flattened", lambda s: [s[0] * s[1]], lambda s: len(s) == 2),
                ("unsqueezed", lambda s: [1, *s], lambda s: True),
                ("plus-one", lambda s: [s[0] + 1, *s[1:]], lambda s: True),
                ("negative", lambda s: [-s[0], *s[1:]], lambda s: True),
                ("string", lambda s: [str(d) for d in s], lambda s: True),
                ("float", lambda s: [d + 0.5 for d in s], lambda s: True),
                ("bool", lambda s: [True] * len(s), lambda s: True),
                ("scalar", lambda s: [], lambda s: True),
                ("null", lambda s: None, lambda s: True)]:
            add(f"shape-{name}", base, header_edit(set_shape(transform, predicate)))
        for name, transform, predicate in [
                ("end-plus-1", lambda b, e: [b, e + 1], lambda b, e: True),
                ("shifted", lambda b, e: [b + 1, e + 1], lambda b, e: True),
                ("overlap", lambda b, e: [b - 1, e - 1], lambda b, e: b > 0),
                ("reversed", lambda b, e: [e, b], lambda b, e: e > b),
                ("out-of-range", lambda b, e: [b, b + 10**15], lambda b, e: True),
                ("negative", lambda b, e: [-1, e], lambda b, e: True),
                ("three", lambda b, e: [b, e, e], lambda b, e: True),
                ("strings", lambda b, e: [str(b), str(e)], lambda b, e: True),
                ("null", lambda b, e: None, lambda b, e: True)]:
            add(f"offsets-{name}", base, header_edit(set_offsets(transform, predicate)))
        add("offsets-swap-sizes", base, header_edit(swap_offsets(same_size=False)))
        add("offsets-swap-same-size", base, header_edit(swap_offsets(same_size=True)), verify=True)
        add("entry-empty-extra", base, header_edit(add_empty_entry([0, 4])))
        add("entry-empty-huge", base, header_edit(add_empty_entry([0, 2**62, 2**62])))
        add("entry-dropped", base, header_edit(drop_entry), count=2)
        add("entry-duplicated", base, header_edit(duplicate_entry))
        add("entry-extra-field", base, header_edit(lambda h, d, r: h[pick(h, r)].update(extra=1)))
        add("entry-not-object", base, header_edit(lambda h, d, r: h.update({pick(h, r): [1, 2]})))
        for name, change in [
                ("missing", lambda h, r: h.pop("__metadata__")),
                ("list", lambda h, r: h.update(__metadata__=["format", "pt"])),
                ("number-value", lambda h, r: h["__metadata__"].update(format=1)),
                ("format-np", lambda h, r: h["__metadata__"].update(format="np")),
                ("hash-missing", set_hash(DELETE)),
                ("hash-null", set_hash(lambda old, h: None)),
                ("hash-short", set_hash(lambda old, h: old[:-1])),
                ("hash-upper", set_hash(lambda old, h: old.upper() if old.upper() != old else "G" + old[1:])),
                ("hash-number", set_hash(lambda old, h: 12345))]:
            add(f"metadata-{name}", base, header_edit(edit_metadata(change)))
        add("metadata-hash-other", base, header_edit(edit_metadata(set_hash(lambda old, h: "0" * 64))), verify=True)
        for name, make in [("list", lambda h: b"[1,2,3]"), ("string", lambda h: b'"abc"'),
                           ("whitespace-start", lambda h: b" " + json.dumps(h).encode()),
                           ("not-utf8", lambda h: b'{"\xff\xfe":1}'),
                           ("duplicate-key", lambda h: json.dumps(h, separators=(",", ":")).encode()[:-1]
                            + b',"' + tensor_names(h)[0].encode() + b'":'
                            + json.dumps(h[tensor_names(h)[0]]).encode() + b"}"),
                           ("deep-nesting", lambda h: b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                           ("nul-bytes", lambda h: b"{" + b"\0" * 64 + b"}")]:
            add(f"header-{name}", base, header_text(make))

        # config.json: not JSON, wrong types, wrong or missing fields.
        for name, content in [("empty", b""), ("not-json", b"not json"), ("open-brace", b"{"), ("list", b"[]"),
                              ("null", b"null"), ("not-utf8", b'{"\xff": 1}'),
                              ("duplicate-key", b'{"quantization_config": {}, "quantization_config": {}}')]:
            add(f"config-{name}", base, write_file(CONFIG_NAME, content))
        add("config-missing", base, delete_file(lambda ckpt, rng: CONFIG_NAME))
        add("config-no-quantization", base, config_edit(lambda c, r: {k: v for k, v in c.items()
                                                                       if k != "quantization_config"}))
        add("config-quantization-string", base, config_edit(lambda c, r: {**c, "quantization_config": "lowbit"}))
        add("config-quant-method-renamed", base, config_edit(
            lambda c, r: {**c, "quantization_config": {("method" if k == "quant_method" else k): v
                                                       for k, v in c["quantization_config"].items()}}))
        for field, value in [("quant_method", DELETE), ("quant_method", "gptq"), ("quant_method", None),
                             ("quant_method", 5), ("format_version", 2), ("format_version", "1"),
                             ("format_version", True), ("format_version", 1.0), ("format_version", DELETE),
                             ("layout", "tiled-planes-v0"), ("layout", DELETE), ("scheme", "int4"),
                             ("scheme", "int9-g32"), ("scheme", 5), ("scheme", None), ("scheme", DELETE),
                             ("modules", []), ("modules", {}), ("modules", DELETE), ("modules", "all"),
                             ("modules_to_not_convert", "lm_head"), ("modules_to_not_convert", [1]),
                             ("modules_to_not_convert", DELETE)]:
            add(f"config-{field}-{'deleted' if value is DELETE else repr(value)}", base,
                config_edit(quant_field(field, value)))
        for name, field, transform, predicate in [
                ("scheme-bad-group", "scheme", lambda s: s.replace("-g32", "-g100").replace("channel", "g100"), None),
                ("scheme-no-group", "scheme", lambda s: s.split("-")[0], None),
                ("scheme-bad-format", "scheme", lambda s: "int9-" + s.split("-", 1)[1], None),
                ("scheme-repeated-flag", "scheme", lambda s: s + "-mx-mx", None),
                ("scheme-number", "scheme", lambda s: 4, None),
                ("scheme-segments", "scheme", other_segments, None),
                ("scheme-groups", "scheme", other_groups, None),
                ("scheme-asym", "scheme", toggle_asym, None),
                ("scheme-deleted", "scheme", DELETE, None),
                ("shape-out-plus-1", "shape", lambda s: [s[0] + 1, s[1]], None),
                ("shape-in-plus-1", "shape", lambda s: [s[0], s[1] + 1], None),
                ("shape-swapped", "shape", lambda s: s[::-1], lambda e: e["shape"][0] != e["shape"][1]),
                ("shape-one-dim", "shape", lambda s: [s[0]], None),
                ("shape-string", "shape", lambda s: f"{s[0]}x{s[1]}", None),
                ("shape-float", "shape", lambda s: [float(s[0]), s[1]], None),
                ("shape-bool", "shape", lambda s: [True, s[1]], None),
                ("shape-zero", "shape", lambda s: [0, s[1]], None),
                ("dtype-float64", "dtype", lambda d: "float64", None),
                ("dtype-int8", "dtype", lambda d: "int8", None),
                ("dtype-number", "dtype", lambda d: 16, None),
                ("dtype-torch-attr", "dtype", lambda d: "Tensor", None),
                ("dtype-other-float", "dtype", lambda d: "bfloat16" if d == "float16" else "float16", None),
                ("dtype-deleted", "dtype", DELETE, None),
                ("act-order-on", "act_order", lambda a: True, lambda e: not e["act_order"]),
                ("act-order-string", "act_order", lambda a: "yes", None)]:
            add(f"config-module-{name}", base, config_edit(module_field(field, transform, predicate or any_entry)))
        add("config-module-not-object", base, config_edit(modules_edit(
            lambda m, c, r: m.update({sorted(m)[0]: "int4-g32"}))))
        add("config-module-removed", base, config_edit(modules_edit(remove_module)))
        add("config-module-renamed", base, config_edit(modules_edit(rename_module)))
        add("config-module-empty-name", base, config_edit(modules_edit(add_module(lambda c: ""))))
        add("config-module-unknown", base, config_edit(modules_edit(add_module(lambda c: "no.such.module"))))
        add("config-module-not-linear", base, config_edit(modules_edit(
            add_module(lambda c: "model.norm" if "model_type" in c else "3"))))
        add("config-module-unquantized", base, config_edit(modules_edit(
            add_module(lambda c: "lm_head" if "model_type" in c else "5"))))

        # Missing, extra, wrong-dtype and wrong-shape tensors, written by safetensors itself.
        add("tensor-missing", base, tensor_edit(lambda k, t: True, drop_tensor), count=3)
        add("tensor-missing-quantized", base, tensor_edit(is_quantized, drop_tensor), count=2)
        add("tensor-missing-index-stale", base, tensor_edit(lambda k, t: True, drop_tensor, update_index=False))
        add("tensor-extra", base, tensor_edit(lambda k, t: True, add_tensor(lambda k: "extra." + k)))
        add("tensor-extra-in-layer", base, tensor_edit(lambda k, t: k.endswith(".scales"),
                                                       add_tensor(lambda k: k.replace(".scales", ".scales2"))))
        add("tensor-extra-weight", base, tensor_edit(lambda k, t: k.endswith(".scales"),
                                                     add_tensor(lambda k: k.replace(".scales", ".weight"))))
        for name, predicate, make in [
                ("scales-dtype", lambda k, t: k.endswith(".scales"),
                 lambda t: t.to(torch.float16 if t.dtype != torch.float16 else torch.bfloat16)),
                ("packed-dtype", lambda k, t: ".packed_" in k,
                 lambda t: t.view(torch.int8) if t.dtype == torch.uint8 else t.view(torch.uint8)),
                ("packed-as-float", lambda k, t: ".packed_" in k,
                 lambda t: t.view({1: torch.float8_e4m3fn, 2: torch.float16, 4: torch.float32}[t.element_size()])),
                ("zeros-signed", lambda k, t: k.endswith(".zeros"), lambda t: t.view(torch.int8)),
                ("unquantized-int", lambda k, t: not is_quantized(k, t) and t.dtype.is_floating_point,
                 lambda t: t.view(torch.int16 if t.element_size() == 2 else torch.int32)),
                ("transposed", lambda k, t: t.dim() == 2 and t.shape[0] != t.shape[1], lambda t: t.T),
                ("row-dropped", lambda k, t: t.dim() >= 1 and t.shape[0] > 1, lambda t: t[:-1]),
                ("row-added", lambda k, t: t.dim() >= 1, lambda t: torch.cat([t, t[:1]])),
                ("flattened", lambda k, t: t.dim() == 2, lambda t: t.reshape(-1)),
                ("unsqueezed", lambda k, t: True, lambda t: t.unsqueeze(0))]:
            add(f"tensor-{name}", base, tensor_edit(predicate, replace_tensor(make)))

        # Flipped data bytes: only the hashes can tell.
        add("flipped-byte", base, flip_data_byte, count=15, verify=True)

    # Hugging Face config fields (llama, loaded with model=None).
    for field, value in [("model_type", DELETE), ("model_type", "bogus"), ("model_type", 5), ("hidden_size", 32),
                         ("num_hidden_layers", 1), ("num_hidden_layers", 3), ("vocab_size", 100),
                         ("tie_word_embeddings", False), ("intermediate_size", 96), ("num_key_value_heads", 4),
                         ("num_attention_heads", "four"), ("attention_bias", True), ("head_dim", 8)]:
        add(f"config-hf-{field}-{'deleted' if value is DELETE else repr(value)}", "llama",
            config_edit(hf_field(field, value)))
    add("both-single-and-index", "llama", write_file(INDEX_NAME, b'{"weight_map": {}}'))
    add("no-weights", "llama", delete_file(lambda ckpt, rng: SINGLE_FILE))
    add("duplicate-tied-tensor", "llama", tensor_edit(lambda k, t: k == "model.embed_tokens.weight",
                                                      add_tensor(lambda k: "lm_head.weight")))

    for name, make in [("int32", lambda t: t.to(torch.int32)), ("repeated", lambda t: torch.cat([t[:1], t[:-1]])),
                       ("out-of-range", lambda t: t + 1), ("negative", lambda t: t - 1)]:
        add(f"tensor-perm-{name}", "mlp", tensor_edit(lambda k, t: k.endswith(".perm"), replace_tensor(make)))

    # The shard index (mlp).
    add("shard-deleted", "mlp", delete_file(lambda ckpt, rng: rng.choice(shards(ckpt)).name))
    add("index-deleted", "mlp", delete_file(lambda ckpt, rng: INDEX_NAME))
    for name, content in [("empty", b""), ("not-json", b"{weight_map"), ("list", b"[]"), ("no-map", b"{}"),
                          ("map-list", b'{"weight_map": []}'), ("map-empty", b'{"weight_map": {}}')]:
        add(f"index-{name}", "mlp", write_file(INDEX_NAME, content))
    for name, transform in [("parent-dir", lambda f, i: "../" + f), ("absolute", lambda f, i: "/etc/" + f),
                            ("hidden", lambda f, i: "." + f), ("not-safetensors", lambda f, i: "config.json"),
                            ("missing-file", lambda f, i: "model-00099-of-00099.safetensors"),
                            ("other-shard", lambda f, i: next(s for s in sorted(set(i["weight_map"].values()))
                                                              if s != f)),
                            ("number", lambda f, i: 1)]:
        add(f"index-remap-{name}", "mlp", index_edit(remap(transform)))
    add("index-key-removed", "mlp", index_edit(lambda i, r: i["weight_map"].pop(r.choice(sorted(i["weight_map"])))))
    add("index-key-extra", "mlp", index_edit(
        lambda i, r: i["weight_map"].update({"phantom.weight": r.choice(sorted(i["weight_map"].values()))})))
    return cases


CASES = build_cases()


def test_enough_cases():
    assert len(CASES) >= 200 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("base", ["llama", "mlp"])
def test_pristine_checkpoints_load(pristine, base):
    assert any(isinstance(m, QuantLinear) for m in load(pristine / base, base, verify=True).modules())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corrupt_checkpoint_raises_checkpoint_error(pristine, tmp_path, case):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine / case.base, ckpt)
    case.mutate(ckpt, random.Random(case.id))
    skeleton = mlp_skeleton() if case.base == "mlp" else None
    start = time.monotonic()
    with pytest.raises(CheckpointError) as error:
        load_quantized(ckpt, model=skeleton, verify=case.verify)
    assert time.monotonic() - start < CASE_TIME_LIMIT_S
    assert str(error.value).strip()
    if skeleton is not None:  # the caller's skeleton is left as it was, not half-converted
        assert not any(isinstance(m, QuantLinear) for m in skeleton.modules())
