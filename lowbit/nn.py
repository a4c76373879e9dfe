"""QuantLinear and quantize_model."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .ops import BACKENDS
from .qweight import QuantizedWeight, packed_layout
from .quantize import quantize
from .quantize.rtn import scale_storage_dtype
from .scheme import Scheme

__all__ = ["QuantLinear", "quantize_model", "quantized_linears"]


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
        return torch.ops.lowbit.matmul(
            x, [getattr(self, n) for n in self._packed_names], self.scales, self.zeros, self.perm, self.bias,
            str(self.scheme), self.out_features, self.in_features,
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
