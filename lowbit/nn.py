"""QuantLinear and quantize_model."""

from __future__ import annotations

import inspect
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops as _ops
from .ops import BACKENDS
from .qweight import QuantizedWeight, check_fusable, fuse_columns, packed_layout
from .quantize import quantize
from .quantize.rtn import scale_storage_dtype
from .scheme import Scheme

__all__ = ["QuantLinear", "quantize_model", "quantized_linears", "fuse_projections", "check_unfused", "FUSABLE_PROJECTIONS"]


class QuantLinear(nn.Module):
    """A drop-in ``nn.Linear`` whose weight is a :class:`QuantizedWeight`.

    Its buffers are the QuantizedWeight's tensors (``packed_0``.., ``scales``, ``zeros``,
    ``perm``), so ``state_dict``, ``.to()`` and checkpoints see them directly.
    """

    def __init__(self, in_features: int, out_features: int, scheme, bias: bool = True,
                 dtype: torch.dtype = torch.float16, device=None, act_order: bool = False):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.scheme = Scheme.parse(scheme)
        self.weight_dtype = dtype
        self.backend = "auto"
        groups = 1 if self.scheme.per_channel else -(-self.in_features // self.scheme.group_size)
        self._packed_names = []
        for i, (shape, packed_dtype) in enumerate(packed_layout(self.scheme, self.out_features, self.in_features)):
            name = f"packed_{i}"
            self.register_buffer(name, torch.zeros(shape, dtype=packed_dtype, device=device))
            self._packed_names.append(name)
        self.register_buffer("scales", torch.ones(groups, self.out_features, device=device,
                                                  dtype=scale_storage_dtype(self.scheme, dtype)))
        self.register_buffer("zeros", None if self.scheme.symmetric else
                             torch.zeros(groups, self.out_features, dtype=torch.uint8, device=device))
        self.register_buffer("perm", torch.arange(self.in_features, device=device) if act_order else None)
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, (self.out_features, self.in_features),
                               tuple(getattr(self, n) for n in self._packed_names), self.scales, self.zeros,
                               self.perm, self.weight_dtype)

    @classmethod
    def from_qweight(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        m = cls(qw.in_features, qw.out_features, qw.scheme, bias=bias is not None, dtype=qw.dtype,
                device="meta", act_order=qw.perm is not None)
        m.load_qweight(qw, bias)
        return m

    def load_qweight(self, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        for name, t in zip(self._packed_names, qw.packed):
            setattr(self, name, t)
        self.scales, self.zeros, self.perm = qw.scales, qw.zeros, qw.perm
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(qw.dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme, method: str = "rtn", **options) -> "QuantLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        qw = quantize(linear.weight.detach(), scheme, method=method, **options)
        return cls.from_qweight(qw, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.call(x, [getattr(self, n) for n in self._packed_names], self.scales, self.zeros, self.perm,
                         self.bias, str(self.scheme), self.out_features, self.in_features,
                         str(self.weight_dtype).removeprefix("torch."), self.backend)

    def set_backend(self, backend: str) -> "QuantLinear":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"bias={self.bias is not None}")


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(name == e or name.endswith("." + e) or name.startswith(e + ".") for e in exclude)


def quantized_linears(model: nn.Module, exclude: Iterable[str] = ("lm_head",)) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules ``quantize_model`` would replace, by qualified name."""
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not _excluded(n, exclude)]


def quantize_model(model: nn.Module, scheme, exclude: Iterable[str] = ("lm_head",), progress: bool = True,
                   method: str = "rtn", **options) -> nn.Module:
    """Replace every ``nn.Linear`` not named in ``exclude`` by a :class:`QuantLinear` (in place).

    ``exclude`` matches a module's qualified name, its last components or a prefix (``"lm_head"``,
    ``"model.layers.0"``). ``method``/``options`` go to :func:`lowbit.quantize` (RTN here; whole-model
    GPTQ, which needs calibration activations, is :func:`lowbit.quantize.gptq.quantize_model_gptq`).
    """
    scheme = Scheme.parse(scheme)
    targets = quantized_linears(model, exclude)
    for name, linear in tqdm(targets, desc=f"quantize {scheme}", disable=not progress, unit="layer"):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(linear, scheme, method=method, **options))
    return model


# Projections that read their module's input and nothing else in the module does: LLaMA-family
# attention (Llama, Mistral, Qwen2, ... in transformers) and gated MLPs.
FUSABLE_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _FusedSlice(nn.Module):
    """Stands in for one projection of a fused group: its columns of the group's output, which the
    module receives in place of the projections' shared input (:class:`_ProjectInput`)."""

    def __init__(self, start: int, size: int):
        super().__init__()
        self.start, self.size = start, size

    def forward(self, fused_output: torch.Tensor) -> torch.Tensor:
        return fused_output[..., self.start:self.start + self.size]

    def extra_repr(self) -> str:
        return f"columns [{self.start}, {self.start + self.size}) of fused_projection"


class _ProjectInput:
    """Forward pre-hook: the module's input (its ``forward``'s first argument, given by position or
    by name) becomes the output of its fused projections."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (module.fused_projection(args[0]), *args[1:]), kwargs
        if self.name not in kwargs:
            raise TypeError(f"{type(module).__name__} with fused projections: its input {self.name!r} is missing")
        return args, {**kwargs, self.name: module.fused_projection(kwargs[self.name])}


# Inputs of cross-attention (transformers): there k/v read another input than q, so they cannot fuse.
_CROSS_INPUTS = ("key_value_states", "encoder_hidden_states", "cross_attention_states")


def _input_name(module: nn.Module) -> str | None:
    """The name of ``module.forward``'s input, or None where its projections may read other inputs."""
    params = list(inspect.signature(module.forward).parameters)
    if not params or getattr(module, "is_cross_attention", False) or any(p in params for p in _CROSS_INPUTS):
        return None
    return params[0]


def _is_projection(m) -> bool:
    return type(m) is nn.Linear or isinstance(m, QuantLinear)


def _check_fusable(parts: list[nn.Module]) -> None:
    if any(p.bias is None for p in parts) and not all(p.bias is None for p in parts):
        raise ValueError("only some of them have a bias")
    if all(isinstance(p, QuantLinear) for p in parts):
        if len({p.backend for p in parts}) > 1:
            raise ValueError(f"their backends differ: {[p.backend for p in parts]}")
        check_fusable([p.qweight for p in parts])
    elif all(type(p) is nn.Linear for p in parts):
        first = parts[0].weight
        if any((p.weight.shape[1], p.weight.dtype, p.weight.device) != (first.shape[1], first.dtype, first.device)
               for p in parts):
            raise ValueError("in_features, dtype and device must match")
    else:
        raise ValueError(f"got {[type(p).__name__ for p in parts]}: all nn.Linear or all QuantLinear")


def _fused_linear(parts: list[nn.Module]) -> nn.Module:
    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    if isinstance(parts[0], QuantLinear):
        return QuantLinear.from_qweight(fuse_columns([p.qweight for p in parts]), bias).set_backend(parts[0].backend)
    w = parts[0].weight
    with torch.device("meta"):  # no initialization of a matrix about to be overwritten
        fused = nn.Linear(w.shape[1], sum(p.out_features for p in parts), bias=bias is not None, dtype=w.dtype)
    fused = fused.to_empty(device=w.device).requires_grad_(False)
    torch.cat([p.weight for p in parts], out=fused.weight)
    if bias is not None:
        fused.bias.copy_(bias)
    return fused


@torch.no_grad()
def fuse_projections(model: nn.Module, groups=FUSABLE_PROJECTIONS) -> int:
    """Run each module's projections of one group (q/k/v, gate/up) as one linear, as serving engines
    do: one kernel reads all of their weights. For inference; returns how many groups were fused.

    In every module holding all projections of a group (plain ``nn.Linear`` or :class:`QuantLinear`),
    they become one ``fused_projection`` (their rows concatenated; quantized parts must share a
    scheme, and all but the last be whole 16-row blocks) and each projection a slice of its output;
    a forward pre-hook hands the module that output instead of its input, so the model's own forward
    is unchanged. That is right where the projections are the only readers of the module's input,
    as in transformers' LLaMA-family attention and MLPs; modules that take a cross-attention input
    are left as they are. Every group is checked before any module changes. A fused model cannot
    be saved (:func:`lowbit.save_quantized` refuses it): save before fusing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_projections takes an nn.Module, got {type(model).__name__}")
    if any(isinstance(g, str) or len(g) < 2 or not all(isinstance(n, str) for n in g) for g in groups):
        raise ValueError(f"groups must be tuples of at least two attribute names, got {groups!r}")
    plans = []
    for name, module in model.named_modules():
        matches = [names for names in groups if all(_is_projection(getattr(module, n, None)) for n in names)]
        if not matches or (input_name := _input_name(module)) is None:
            continue
        where = name or "model"
        if len(matches) > 1 or hasattr(module, "fused_projection"):
            raise ValueError(f"{where}: holds more than one group of projections to fuse ({matches}); "
                             "a module takes at most one fused projection")
        try:
            _check_fusable([getattr(module, n) for n in matches[0]])
        except ValueError as e:
            raise ValueError(f"{where}: {', '.join(matches[0])} do not fuse: {e}") from None
        plans.append((module, matches[0], input_name))
    for module, names, input_name in plans:  # one group at a time: its parts are freed before the next
        module.fused_projection = _fused_linear([getattr(module, n) for n in names])
        start = 0
        for n in names:
            size = getattr(module, n).out_features
            setattr(module, n, _FusedSlice(start, size))
            start += size
        module.register_forward_pre_hook(_ProjectInput(input_name), with_kwargs=True)
    return len(plans)


def check_unfused(model: nn.Module) -> None:
    """Raise ValueError if :func:`fuse_projections` changed ``model``: checkpoints hold the unfused
    projections (fused names would not load back)."""
    if any(isinstance(m, _FusedSlice) for m in model.modules()):
        raise ValueError("the model's projections were fused by lowbit.fuse_projections (for inference); "
                         "save it before fusing")
