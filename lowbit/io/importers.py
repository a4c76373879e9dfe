"""Import GPTQ, AWQ and compressed-tensors INT checkpoints into lowbit, without re-quantizing.

Each source layout (see the formats' own packers) is unpacked to integer codes ``[N, K]``, scales
and zero points ``[N, G]``, which map one to one onto lowbit's integer schemes, then packed by
:func:`lowbit.quantize.rtn.build`. ``QuantizedWeight.dequantize(torch.float32)`` is then equal,
bit for bit, to the source format's own ``(q - z) * s``.

* GPTQ (AutoGPTQ / GPTQModel): ``qweight`` int32 ``[K*b/32, N]`` packed along K, ``qzeros`` int32
  ``[G, N*b/32]`` packed along N storing ``zero - 1`` (``checkpoint_format: gptq``, the v1
  off-by-one) or ``zero`` (``gptq_v2``), ``scales`` ``[G, N]``, ``g_idx`` ``[K]``.
* AWQ GEMM: ``qweight`` int32 ``[K, N/8]`` packed along N in the order ``AWQ_PACK_ORDER``,
  ``qzeros`` ``[G, N/8]`` packed alike, ``scales`` ``[G, N]``.
* compressed-tensors ``pack-quantized``: ``weight_packed`` int32 ``[N, K*b/32]`` of ``v + 2^(b-1)``,
  ``weight_scale`` ``[N, G]``, ``weight_zero_point`` int32 ``[N*b/32, G]`` (asymmetric), optional
  ``weight_g_idx`` ``[K]``.

Act-order (``g_idx``) becomes lowbit's ``perm``: the columns sorted by group, which must then form
contiguous groups of ``group_size``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..qweight import QuantizedWeight
from ..quantize.rtn import build
from ..scheme import Scheme

__all__ = ["FORMATS", "detect_format", "read_source_config", "convert_tensors", "load_foreign", "convert",
           "AWQ_PACK_ORDER"]

FORMATS = ("gptq", "awq", "compressed-tensors")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble slot i of an AWQ word holds column 8c + AWQ_PACK_ORDER[i]
# Quantization configs written beside config.json by AutoGPTQ and older AutoAWQ.
_SIDE_CONFIGS = {"quantize_config.json": "gptq", "quant_config.json": "awq"}
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# -- configs -----------------------------------------------------------------------------------

def read_source_config(src_dir) -> dict:
    """``config.json`` of ``src_dir`` with its ``quantization_config``, taken from a side file
    (``quantize_config.json``, ``quant_config.json``) where config.json has none."""
    src = Path(src_dir)
    config = json.loads((src / "config.json").read_text())
    if not config.get("quantization_config"):
        for name, method in _SIDE_CONFIGS.items():
            if (src / name).is_file():
                config["quantization_config"] = {"quant_method": method, **json.loads((src / name).read_text())}
                break
    return config


def detect_format(config) -> str | None:
    """``"gptq"``, ``"awq"`` or ``"compressed-tensors"`` for a checkpoint lowbit imports, None for a
    lowbit or unquantized one; ValueError naming the method for any other quantized checkpoint.
    ``config`` is a parsed config.json (dict) or a checkpoint directory."""
    if not isinstance(config, dict):
        config = read_source_config(config)
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "lowbit":
        return None
    if method not in FORMATS:
        raise ValueError(f"quant_method {method!r} is not supported: lowbit imports {', '.join(FORMATS)} checkpoints")
    return method


def _int_field(qc: dict, *names: str, default=None) -> int:
    for n in names:
        if qc.get(n) is not None:
            return int(qc[n])
    if default is None:
        raise ValueError(f"quantization_config has none of {names}")
    return default


# -- unpacking ---------------------------------------------------------------------------------

def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes of ``bits`` each, packed ``32 // bits`` to an int32 word along ``dim``, value j of a
    word at bits ``bits*j``: returns them (int64) with ``dim`` grown ``32 // bits`` times."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    per_word = 32 // bits
    words = packed.to(torch.int64).movedim(dim, -1).unsqueeze(-1)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    codes = ((words >> shifts) & ((1 << bits) - 1)).flatten(-2)
    return codes.movedim(-1, dim)


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ ``[rows, N/8]`` words -> ``[rows, N]`` codes in column order."""
    slots = unpack_int32(packed, 4, dim=1)
    n = slots.shape[1]
    column_of_slot = (torch.arange(n) // 8) * 8 + torch.tensor(AWQ_PACK_ORDER).repeat(n // 8)
    return torch.empty_like(slots).index_copy_(1, column_of_slot, slots)


# -- the common target -------------------------------------------------------------------------

@dataclass
class IntWeight:
    """One source layer unpacked: ``codes [N, K]`` in original column order, ``scales [N, G]``,
    ``zeros [N, G]`` (None: the symmetric ``2^(bits-1)``), ``g_idx [K]`` (None: ``k // group_size``)."""
    bits: int
    group_size: int  # -1: one scale per output row
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None


def _act_order_perm(g_idx: torch.Tensor, group_size: int, variant: str) -> torch.Tensor | None:
    """lowbit ``perm`` for a per-column group index: columns sorted by group, which must give
    contiguous groups of ``group_size``; None when ``g_idx`` is already the plain ``k // group_size``."""
    k = g_idx.numel()
    contiguous = torch.arange(k) // (k if group_size == -1 else group_size)
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, contiguous):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], contiguous):
        raise ValueError(f"{variant}: g_idx does not put exactly {group_size} columns in each group, so it is not a "
                         "permutation of contiguous groups and lowbit cannot represent it")
    return perm


def to_quantized_weight(w: IntWeight, dtype: torch.dtype, variant: str) -> QuantizedWeight:
    """Repack an unpacked source weight into lowbit's layout, codes, scales and zeros unchanged."""
    if not 2 <= w.bits <= 8:
        raise ValueError(f"{variant}: {w.bits}-bit weights are not supported (lowbit stores 2 to 8 bits)")
    offset = 1 << (w.bits - 1)
    zeros = w.zeros
    if zeros is not None and zeros.max() > 255:
        raise ValueError(f"{variant}: zero point {int(zeros.max())} does not fit lowbit's uint8 zero points")
    symmetric = zeros is None or bool((zeros == offset).all())
    try:
        scheme = Scheme(f"int{w.bits}", w.group_size, symmetric=symmetric)
    except ValueError as e:
        raise ValueError(f"{variant}: group size {w.group_size} cannot be represented in lowbit ({e})") from None
    codes, perm = w.codes, None
    if w.g_idx is not None:
        perm = _act_order_perm(w.g_idx, w.group_size, variant)
        if perm is not None:
            codes = codes[:, perm]
    if not w.scales.is_floating_point():
        raise ValueError(f"{variant}: scales must be floating point, got {w.scales.dtype}")
    scales = w.scales
    if scheme.per_channel:
        scales = scales.to(torch.float32)  # lowbit keeps per-channel scales in float32 (exactly)
    else:
        dtype = scales.dtype  # group scales are stored in the weight's dtype: keep the source's bits
    return build(scheme, codes.to(torch.uint8), scales, None if symmetric else zeros.to(torch.uint8), dtype, perm)


# -- per format --------------------------------------------------------------------------------

def _gptq_layers(qc: dict, tensors: dict[str, torch.Tensor]) -> dict[str, IntWeight]:
    bits = _int_field(qc, "bits")
    fmt = str(qc.get("checkpoint_format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq' and 'gptq_v2')")
    if 32 % bits:
        raise ValueError(f"GPTQ {bits}-bit packing (codes straddling int32 words) is not supported")
    group_size = _int_field(qc, "group_size", default=-1)
    layers = {}
    for name in _prefixes(tensors, "qweight"):
        qweight, qzeros, scales = _take(tensors, name, ("qweight", "qzeros", "scales"), "GPTQ")
        g_idx = tensors.pop(f"{name}.g_idx", None)
        codes = unpack_int32(qweight, bits, dim=0)  # [K, N]
        n = codes.shape[1]
        zeros = unpack_int32(qzeros, bits, dim=1)[:, :n]
        if fmt == "gptq":
            zeros = zeros + 1  # v1 stores zero - 1 (its own dequantization adds the 1 back)
        layers[name] = IntWeight(bits, group_size, codes.T, scales.T, zeros.T, g_idx)
    return layers


def _awq_layers(qc: dict, tensors: dict[str, torch.Tensor]) -> dict[str, IntWeight]:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported (only the GEMM packing)")
    if not qc.get("zero_point", True):
        raise ValueError("AWQ without zero points (zero_point: false) is not supported")
    bits = _int_field(qc, "bits", "w_bit")
    if bits != 4:
        raise ValueError(f"AWQ {bits}-bit packing is not supported (only 4-bit GEMM)")
    group_size = _int_field(qc, "group_size", "q_group_size", default=-1)
    layers = {}
    for name in _prefixes(tensors, "qweight"):
        qweight, qzeros, scales = _take(tensors, name, ("qweight", "qzeros", "scales"), "AWQ")
        layers[name] = IntWeight(bits, group_size, _awq_unpack(qweight).T, scales.T, _awq_unpack(qzeros).T, None)
    return layers


def _compressed_tensors_args(qc: dict, name: str) -> tuple[dict, str]:
    """The weight quantization args and format of the config group targeting module ``name``."""
    matches = []
    for group_name, group in (qc.get("config_groups") or {}).items():
        for target in group.get("targets", []):
            by_name = bool(re.match(target[3:], name)) if target.startswith("re:") else target == name
            if by_name or target == "Linear":
                matches.append((not by_name, group_name, group))
    if not matches:
        raise ValueError(f"compressed-tensors: no config group targets {name!r}")
    _, group_name, group = min(matches, key=lambda m: m[0])  # a name match wins over the class match
    if group.get("input_activations") or group.get("output_activations"):
        raise ValueError(f"compressed-tensors group {group_name!r}: activation quantization is not supported "
                         "(lowbit is weight-only)")
    return group["weights"], str(group.get("format") or qc.get("format")).lower()


def _compressed_tensors_layers(qc: dict, tensors: dict[str, torch.Tensor]) -> dict[str, IntWeight]:
    sparsity = (qc.get("sparsity_config") or {}).get("format")
    if sparsity not in (None, "dense"):
        raise ValueError(f"compressed-tensors sparsity format {sparsity!r} is not supported: lowbit imports dense "
                         "(sparsity format 'dense') checkpoints only; its own 2:4 schemes come from lowbit.quantize")
    layers = {}
    for name in _prefixes(tensors, "weight_packed"):
        args, fmt = _compressed_tensors_args(qc, name)
        if fmt != "pack-quantized":
            raise ValueError(f"compressed-tensors format {fmt!r} is not supported (only 'pack-quantized')")
        if args.get("type", "int") != "int":
            raise ValueError(f"compressed-tensors weight type {args.get('type')!r} is not supported (only 'int')")
        strategy = args.get("strategy")
        if strategy not in ("group", "channel"):
            raise ValueError(f"compressed-tensors strategy {strategy!r} is not supported (only 'group', 'channel')")
        bits = int(args["num_bits"])
        shape, packed, scales = _take(tensors, name, ("weight_shape", "weight_packed", "weight_scale"),
                                      "compressed-tensors")
        n, k = (int(d) for d in shape)
        codes = unpack_int32(packed, bits, dim=1)[:, :k]
        zero_point = tensors.pop(f"{name}.weight_zero_point", None)
        zeros = None
        if not args.get("symmetric", True):
            if zero_point is None or zero_point.dtype != torch.int32:
                raise ValueError(f"compressed-tensors layer {name}: asymmetric weights need integer zero points "
                                 f"packed in int32, got {None if zero_point is None else zero_point.dtype}")
            zeros = unpack_int32(zero_point, bits, dim=0)[:n]  # stored as z + 2^(b-1), like the codes
        group_size = int(args["group_size"]) if strategy == "group" else -1
        layers[name] = IntWeight(bits, group_size, codes, scales, zeros, tensors.pop(f"{name}.weight_g_idx", None))
    return layers


_LAYER_READERS = {"gptq": _gptq_layers, "awq": _awq_layers, "compressed-tensors": _compressed_tensors_layers}


def _take(tensors: dict, name: str, suffixes: tuple[str, ...], variant: str) -> list[torch.Tensor]:
    missing = [f"{name}.{s}" for s in suffixes if f"{name}.{s}" not in tensors]
    if missing:
        raise ValueError(f"{variant} layer {name}: missing tensor(s) {missing}")
    return [tensors.pop(f"{name}.{s}") for s in suffixes]


def _prefixes(tensors: dict, suffix: str) -> list[str]:
    return sorted(k.removesuffix("." + suffix) for k in tensors if k.endswith("." + suffix))


def convert_tensors(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A source checkpoint's tensors -> (lowbit state dict, the ``modules`` entry of lowbit's config).

    Quantized layers become ``<module>.packed_0``.., ``.scales``, ``.zeros``, ``.perm``; every other
    tensor (biases, norms, embeddings) passes through unchanged."""
    fmt = detect_format(config)
    if fmt is None:
        raise ValueError("config.json names no GPTQ, AWQ or compressed-tensors quantization")
    qc = config["quantization_config"]
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float16"))
    rest = dict(tensors)
    layers = _LAYER_READERS[fmt](qc, rest)
    if not layers:
        raise ValueError(f"{fmt} checkpoint has no quantized layers")
    out, modules = {}, {}
    for name, layer in layers.items():
        qw = to_quantized_weight(layer, dtype, f"{fmt} layer {name}")
        out.update({f"{name}.{t}": v for t, v in qw.tensors().items()})
        meta = qw.meta()
        modules[name] = {"scheme": meta["scheme"], "shape": meta["shape"], "dtype": meta["dtype"],
                         "act_order": qw.perm is not None}
    out.update(rest)
    return out, modules


# -- whole checkpoints -------------------------------------------------------------------------

def load_tensors(src_dir) -> dict[str, torch.Tensor]:
    files = sorted(Path(src_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{src_dir}: no .safetensors weights (only safetensors checkpoints are imported)")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def load_foreign(src_dir, **from_pretrained_kwargs):
    """A transformers model with :class:`lowbit.QuantLinear` layers from a GPTQ, AWQ or
    compressed-tensors checkpoint directory (needs transformers)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from ..integrations.transformers import LowbitConfig, register

    register()
    config = read_source_config(src_dir)
    state_dict, modules = convert_tensors(config, load_tensors(src_dir))
    schemes = Counter(m["scheme"] for m in modules.values())
    hf_config = AutoConfig.from_pretrained(src_dir)
    hf_config.quantization_config = LowbitConfig(scheme=schemes.most_common(1)[0][0], modules=modules,
                                                 modules_to_not_convert=[]).to_dict()
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    return model_class.from_pretrained(None, config=hf_config, state_dict=state_dict, **from_pretrained_kwargs)


def convert(src_dir, out_dir) -> Path:
    """Write a lowbit checkpoint of the GPTQ/AWQ/compressed-tensors checkpoint ``src_dir`` to
    ``out_dir``, with its tokenizer and other side files; returns ``out_dir``."""
    from .checkpoint import save_quantized

    out = Path(out_dir)
    save_quantized(load_foreign(src_dir), out)
    skip = {"config.json", *_SIDE_CONFIGS, *_WEIGHT_INDEX_FILES}
    for f in Path(src_dir).iterdir():
        side_file = f.is_file() and f.name not in skip and not f.name.endswith(_WEIGHT_FILE_SUFFIXES)
        if side_file and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return out
