"""vLLM plugin: serve lowbit checkpoints with ``vllm.LLM(model=dir)`` / ``vllm serve dir``.

The entry point ``vllm.general_plugins: lowbit = lowbit.integrations.vllm:register`` makes vLLM
call :func:`register` in every process; the checkpoint's ``quant_method: "lowbit"`` then selects
the method. Each quantized linear layer gets lowbit's tensors as vLLM parameters, sharded for
tensor parallelism on the dimensions in ``SHARD_DIMS``:

* ``packed_i`` ``[row blocks, words]`` (layout ``tiled-planes-v4``, see :mod:`lowbit.pack`): dim 0
  holds blocks of ``ROW_BLOCK = 16`` output rows, so column-parallel shards and the parts of fused
  QKV / gate-up layers are whole blocks: their row offsets and sizes must be multiples of 16
  (only the last part of a layer may end on its last row). vLLM gets the packed tensors as
  ``PackedvLLMParameter`` packed on the output dimension by 16, and divides its fused-shard row
  offsets accordingly. Within a block, the input dimension is cut in ``TILE_K``-wide tiles, tile
  after tile, so a row-parallel shard whose input size is a multiple of ``TILE_K`` is a plain
  slice of words. Any other row-parallel shard is loaded whole and repacked to the rank's columns
  in ``process_weights_after_loading``.
* ``scales``/``zeros`` ``[groups, out]``: column-parallel slices dim 1, row-parallel dim 0 (whole
  groups; per-channel scales are replicated).
* ``perm`` ``[in]`` (act-order): replicated; the parts of a fused layer must share it.

2:4 sparse schemes are refused (:func:`check_dense`): their compressed columns have no
tensor-parallel sharding here.

:func:`column_shard`, :func:`row_shard` and :func:`fuse_columns` split a QuantizedWeight the same
way without vLLM (the tests check them against the unsharded matmul).
"""

from __future__ import annotations

import functools

import torch

from .. import ops as lowbit_ops
from .. import pack as _pack
from ..qweight import QuantizedWeight, check_row_blocks, fuse_columns, packed_layout
from ..scheme import Scheme

__all__ = ["register", "QUANT_METHOD", "SHARD_DIMS", "column_shard", "row_shard", "fuse_columns",
           "slice_input_codes", "check_row_parallel", "row_shards_are_word_slices", "check_dense",
           "check_row_blocks", "check_output_partitions"]

QUANT_METHOD = "lowbit"
# (output_dim, input_dim) of each tensor kind as vLLM shards it; None: not split on that dimension.
SHARD_DIMS = {"packed": (0, 1), "scales": (1, 0), "zeros": (1, 0), "perm": (None, None)}


# -- sharding without vLLM -----------------------------------------------------------------------

def _words(k: int, bits: int, seg_bits: int) -> int:
    """Words of a row block of the ``seg_bits``-wide segment holding ``k`` input columns (``k`` rounded
    up to whole tiles)."""
    return _pack.segment_shape(1, k, bits, seg_bits)[1]


def input_slice_is_plain(in_features: int, start: int, size: int) -> bool:
    """Whether input columns ``[start, start+size)`` are whole tiles of the packed layout."""
    return start % _pack.TILE_K == 0 and (size % _pack.TILE_K == 0 or start + size == in_features)


def slice_input_codes(packed, bits: int, in_features: int, start: int, size: int, *,
                      rows: int) -> tuple[torch.Tensor, ...]:
    """Packed codes of input columns ``[start, start+size)`` of a ``[rows, in_features]`` weight: a
    slice of words on tile boundaries, else unpack, slice and pack again (a tile mixes the columns
    of two shards)."""
    if input_slice_is_plain(in_features, start, size):
        return tuple(p[:, _words(start, bits, s): _words(start, bits, s) + _words(size, bits, s)]
                     for p, s in zip(packed, _pack.SEGMENTS[bits]))
    codes = _pack.unpack_codes(tuple(packed), bits, in_features, rows=rows)[:, start:start + size]
    return _pack.pack_codes(codes.contiguous(), bits)


def row_shards_are_word_slices(in_features: int, tp_size: int) -> bool:
    """Whether vLLM's own row-parallel loading (rank r takes the r-th equal slice of packed words)
    gives each rank its columns: only when a shard is whole 128-wide tiles."""
    return tp_size == 1 or (in_features // tp_size) % _pack.TILE_K == 0


def check_dense(schemes: dict) -> None:
    """Raise ValueError naming the modules of ``schemes`` (name -> scheme) that are 2:4 sparse: the
    plugin shards only dense layouts (a sparse row-parallel shard would cut compressed columns)."""
    sparse = [f"{name} ({scheme})" for name, scheme in schemes.items() if Scheme.parse(scheme).sparsity]
    if sparse:
        more = f" and {len(sparse) - 3} more" if len(sparse) > 3 else ""
        raise ValueError(f"the lowbit vLLM plugin does not serve 2:4 sparse schemes (no tensor-parallel sharding of "
                         f"their compressed columns): {', '.join(sparse[:3])}{more}; load the checkpoint with "
                         "lowbit.load_quantized or transformers instead")


def check_row_parallel(scheme, in_features: int, tp_size: int, act_order: bool, name: str = "layer") -> None:
    """Raise ValueError where lowbit cannot split the input dimension ``tp_size`` ways."""
    if in_features % tp_size:
        raise ValueError(f"{name}: in_features {in_features} is not divisible by tensor-parallel size {tp_size}")
    if act_order:
        raise ValueError(f"{name}: act-order (perm) weights cannot be split along the input dimension "
                         "(each shard's columns would not form whole groups); use tensor_parallel_size=1")
    shard = in_features // tp_size
    if not scheme.per_channel and shard % scheme.group_size:
        raise ValueError(f"{name}: the input shard of {shard} columns is not a whole number of "
                         f"{scheme.group_size}-column groups")


def check_output_partitions(name: str, partition_sizes: list[int], output_size: int) -> None:
    """Raise ValueError unless vLLM can load each of a layer's output partitions (the rank's rows of
    each fused part) as whole row blocks: vLLM divides the partitions' row offsets and sizes by
    ``ROW_BLOCK`` rounding down, so only a layer whose one partition is its whole output (not
    column-sharded, not fused) may end in a partial block."""
    if partition_sizes == [output_size]:
        return
    if any(size % _pack.ROW_BLOCK for size in partition_sizes):
        raise ValueError(f"{name}: vLLM gives this rank output partitions of {partition_sizes} rows (one per fused "
                         f"part; {output_size} rows over all ranks), which must be multiples of {_pack.ROW_BLOCK}: the "
                         f"packed layout {_pack.LAYOUT} stores rows in {_pack.ROW_BLOCK}-row blocks; use a "
                         "tensor_parallel_size that leaves whole blocks, or load the checkpoint with "
                         "lowbit.load_quantized or transformers")


def column_shard(qw: QuantizedWeight, start: int, size: int) -> QuantizedWeight:
    """Output rows ``[start, start+size)`` of ``qw`` (column parallelism): whole 16-row blocks."""
    check_row_blocks("column_shard", start, size, qw.out_features)
    first_block = start // _pack.ROW_BLOCK
    out_dim = SHARD_DIMS["packed"][0]
    packed = tuple(p.narrow(out_dim, first_block, _pack.row_blocks(start + size) - first_block) for p in qw.packed)

    def rows(t, kind):
        return None if t is None else t.narrow(SHARD_DIMS[kind][0], start, size)

    return QuantizedWeight(qw.scheme, (size, qw.in_features), packed, rows(qw.scales, "scales"),
                           rows(qw.zeros, "zeros"), qw.perm, qw.dtype)


def row_shard(qw: QuantizedWeight, rank: int, tp_size: int) -> QuantizedWeight:
    """Rank ``rank``'s share of the input columns of ``qw`` (row parallelism): its matmul with the
    rank's slice of x is the rank's partial sum of ``x @ W.T``. Packed words are split as vLLM's
    loader splits them where that is right, else repacked as the plugin does after loading."""
    check_dense({"weight": qw.scheme})
    check_row_parallel(qw.scheme, qw.in_features, tp_size, qw.perm is not None)
    size = qw.in_features // tp_size
    start = rank * size
    if row_shards_are_word_slices(qw.in_features, tp_size):
        in_dim = SHARD_DIMS["packed"][1]
        packed = tuple(p.narrow(in_dim, rank * (p.shape[in_dim] // tp_size), p.shape[in_dim] // tp_size)
                       for p in qw.packed)
    else:
        packed = slice_input_codes(qw.packed, qw.scheme.bits, qw.in_features, start, size, rows=qw.out_features)

    def groups(t, kind):
        if t is None or qw.scheme.per_channel:  # one group spans every rank's columns
            return t
        g = qw.scheme.group_size
        return t.narrow(SHARD_DIMS[kind][1], start // g, size // g)

    scales, zeros = groups(qw.scales, "scales"), groups(qw.zeros, "zeros")
    return QuantizedWeight(qw.scheme, (qw.out_features, size), packed, scales, zeros, None, qw.dtype)


# -- vLLM ----------------------------------------------------------------------------------------

def register() -> None:
    """Register the ``lowbit`` quantization method with vLLM; safe to call in every process and
    any number of times."""
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
    from vllm.model_executor.layers.quantization import register_quantization_config

    config_class, method_class = _vllm_classes()
    register_quantization_config(QUANT_METHOD)(config_class)
    if method_class.__name__ not in WEIGHT_LOADER_V2_SUPPORTED:
        WEIGHT_LOADER_V2_SUPPORTED.append(method_class.__name__)


@functools.cache
def _vllm_classes():
    """The vLLM subclasses, built on first use so that this module imports without vLLM."""
    from torch import nn
    from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    from vllm.model_executor.parameter import (BasevLLMParameter, ChannelQuantScaleParameter,
                                               GroupQuantScaleParameter, PackedvLLMParameter)

    from ..quantize.rtn import scale_storage_dtype
    from .transformers import LowbitConfig

    class LowbitLinearMethod(LinearMethodBase):
        """One (possibly fused, possibly sharded) quantized linear layer."""

        def __init__(self, scheme: Scheme, dtype: torch.dtype, act_order: bool, prefix: str):
            self.scheme, self.dtype, self.act_order, self.prefix = scheme, dtype, act_order, prefix
            self.packed_names = [f"packed_{i}" for i in range(len(_pack.SEGMENTS[scheme.bits]))]

        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                           output_size, params_dtype, **extra_weight_attrs):
            weight_loader = extra_weight_attrs["weight_loader"]
            n, k = sum(output_partition_sizes), input_size_per_partition
            check_output_partitions(self.prefix, output_partition_sizes, output_size)
            tp_size = input_size // k  # > 1: row parallel
            if tp_size > 1:
                check_row_parallel(self.scheme, input_size, tp_size, self.act_order, self.prefix)
            # A shard that is not whole tiles is loaded whole and cut to the rank's columns after loading.
            repack = not row_shards_are_word_slices(input_size, tp_size)
            layer.lowbit_loaded_input = (input_size, layer.tp_rank * k) if repack else (k, 0)  # (columns, offset)
            layer.lowbit_out_features, layer.lowbit_in_features = n, k
            for name, (shape, packed_dtype) in zip(self.packed_names,
                                                   packed_layout(self.scheme, n, input_size if repack else k)):
                data = torch.empty(shape, dtype=packed_dtype)
                out_dim, in_dim = SHARD_DIMS["packed"]
                # packed_factor: vLLM's row offsets of fused parts become offsets in row blocks.
                layer.register_parameter(name, BasevLLMParameter(data=data, weight_loader=weight_loader) if repack else
                                         PackedvLLMParameter(data=data, output_dim=out_dim, input_dim=in_dim,
                                                             packed_dim=out_dim, packed_factor=_pack.ROW_BLOCK,
                                                             weight_loader=weight_loader))
            groups = 1 if self.scheme.per_channel else -(-k // self.scheme.group_size)
            group_tensors = {"scales": scale_storage_dtype(self.scheme, self.dtype)}
            if not self.scheme.symmetric:
                group_tensors["zeros"] = torch.uint8
            for name, dtype in group_tensors.items():
                data = torch.empty(groups, n, dtype=dtype)
                out_dim, in_dim = SHARD_DIMS[name]
                layer.register_parameter(name, ChannelQuantScaleParameter(data=data, output_dim=out_dim,
                                                                          weight_loader=weight_loader)
                                         if self.scheme.per_channel else
                                         GroupQuantScaleParameter(data=data, output_dim=out_dim, input_dim=in_dim,
                                                                  weight_loader=weight_loader))
            if self.act_order:
                perm = torch.full((k,), -1, dtype=torch.int64)
                layer.register_parameter("perm", BasevLLMParameter(data=perm, weight_loader=load_shared_perm))

        def process_weights_after_loading(self, layer) -> None:
            packed = [getattr(layer, name).data for name in self.packed_names]
            loaded_k, start = layer.lowbit_loaded_input
            if loaded_k != layer.lowbit_in_features:
                packed = slice_input_codes(packed, self.scheme.bits, loaded_k, start, layer.lowbit_in_features,
                                           rows=layer.lowbit_out_features)
            # Plain parameters from here on: the forward needs no weight loaders.
            for name, data in zip(self.packed_names, packed):
                setattr(layer, name, nn.Parameter(data.contiguous(), requires_grad=False))
            for name in ("scales", "zeros", "perm"):
                if hasattr(layer, name):
                    setattr(layer, name, nn.Parameter(getattr(layer, name).data, requires_grad=False))

        def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            return lowbit_ops.call(
                x, [getattr(layer, name) for name in self.packed_names], layer.scales, getattr(layer, "zeros", None),
                getattr(layer, "perm", None), bias, str(self.scheme), layer.lowbit_out_features,
                layer.lowbit_in_features, str(self.dtype).removeprefix("torch."), "auto")

    def load_shared_perm(param, loaded_weight: torch.Tensor, *shard_id) -> None:
        """Each part of a fused layer brings its perm: the first is kept, the others must equal it."""
        if bool((param.data < 0).all()):
            param.data.copy_(loaded_weight)
        elif not torch.equal(param.data, loaded_weight.to(param.dtype)):
            raise ValueError("the parts of a fused act-order layer have different permutations; "
                             "lowbit needs one permutation per fused layer")

    class LowbitVllmConfig(QuantizationConfig):
        def __init__(self, modules: dict[str, dict]):
            super().__init__()
            self.modules = modules

        @classmethod
        def get_name(cls) -> str:
            return QUANT_METHOD

        @classmethod
        def get_supported_act_dtypes(cls) -> list[torch.dtype]:
            return [torch.float16, torch.bfloat16, torch.float32]

        @classmethod
        def get_min_capability(cls) -> int:
            return 80  # the Triton kernels use bf16 and Ampere's tensor-core shapes

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []  # the quantization_config of config.json says it all

        @classmethod
        def from_config(cls, config: dict) -> "LowbitVllmConfig":
            modules = LowbitConfig.from_dict(config).modules
            check_dense({name: meta["scheme"] for name, meta in modules.items()})
            return cls(modules)

        def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
            self.modules = hf_to_vllm_mapper.apply_dict(self.modules)

        def parts_of(self, prefix: str) -> list[str]:
            """The checkpoint modules a vLLM layer holds: ``qkv_proj`` -> ``q_proj``, ``k_proj``, ``v_proj``."""
            parent, _, last = prefix.rpartition(".")
            return [f"{parent}.{p}" if parent else p for p in self.packed_modules_mapping.get(last, [last])]

        def get_quant_method(self, layer, prefix: str):
            if not isinstance(layer, LinearBase):
                if prefix in self.modules:
                    raise ValueError(f"{prefix}: vLLM holds it as a {type(layer).__name__}, which the lowbit plugin "
                                     "cannot quantize; quantize it with modules_to_not_convert=['lm_head'] (the default)")
                return None
            parts = self.parts_of(prefix)
            metas = [self.modules.get(p) for p in parts]
            if all(m is None for m in metas):
                return UnquantizedLinearMethod()
            kinds = {None if m is None else (m["scheme"], m["dtype"], bool(m["act_order"])) for m in metas}
            if len(kinds) != 1:
                raise ValueError(f"{prefix}: vLLM fuses {parts}, which lowbit quantized differently "
                                 f"({[None if m is None else m['scheme'] for m in metas]})")
            scheme, dtype, act_order = kinds.pop()
            return LowbitLinearMethod(Scheme.parse(scheme), getattr(torch, dtype), act_order, prefix)

    # Module-level names (see __getattr__), so that vLLM can pickle the config into its engine process.
    LowbitVllmConfig.__qualname__, LowbitLinearMethod.__qualname__ = "LowbitVllmConfig", "LowbitLinearMethod"
    return LowbitVllmConfig, LowbitLinearMethod


def __getattr__(name: str):
    if name in ("LowbitVllmConfig", "LowbitLinearMethod"):
        return dict(zip(("LowbitVllmConfig", "LowbitLinearMethod"), _vllm_classes()))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
