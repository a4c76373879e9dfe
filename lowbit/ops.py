"""The ``lowbit::matmul`` custom op: ``x @ W.T (+ bias)`` for a quantized ``W``.

Registered with ``torch.library`` (with a fake implementation) so ``torch.compile`` traces it
as one opaque node and CUDA graphs capture it. Backends:

* ``reference``: dequantize, then multiply in float32 (any device; the CPU path).
* ``triton``: the Triton kernels (CUDA, or the Triton interpreter on CPU with TRITON_INTERPRET=1).
* ``auto``: on CUDA, the kernel dispatcher (fused kernel or dequantize + cuBLAS, whichever the
  tuned tables say is faster for this shape); elsewhere ``reference``.

Callers go through :func:`call`, which skips the op's dispatch in plain eager calls (~110 us of
Python a call on an H200 host, against ~20 us for a whole fp16 ``F.linear``: it made an eager
prefill host-bound).
"""

from __future__ import annotations

from typing import Optional

import torch

from .qweight import QuantizedWeight
from .scheme import Scheme

__all__ = ["matmul", "call", "BACKENDS"]

BACKENDS = ("auto", "triton", "reference")


def _weight(packed, scales, zeros, perm, scheme, n, k, weight_dtype) -> QuantizedWeight:
    return QuantizedWeight(Scheme.parse(scheme), (n, k), tuple(packed), scales, zeros, perm,
                           getattr(torch, weight_dtype))


def reference_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.to(torch.float32) @ qw.dequantize(torch.float32).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def _matmul_impl(x: torch.Tensor, packed: list[torch.Tensor], scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], scheme: str, out_features: int,
                 in_features: int, weight_dtype: str, backend: str) -> torch.Tensor:
    qw = _weight(packed, scales, zeros, perm, scheme, out_features, in_features, weight_dtype)
    _check_width(x, in_features)  # (QuantLinear does not run check_inputs; the kernels take K from x)
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)  # (a reshape costs ~3 us of Python a call)
    if backend == "reference" or (backend == "auto" and x.device.type != "cuda"):
        y = reference_matmul(x2, qw, bias)
    else:
        from .kernels import dispatch

        y = dispatch.matmul(x2, qw, bias, force_triton=backend == "triton")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


_matmul_op = torch.library.custom_op("lowbit::matmul", _matmul_impl, mutates_args=())


@_matmul_op.register_fake
def _(x, packed, scales, zeros, perm, bias, scheme, out_features, in_features, weight_dtype, backend):
    return x.new_empty((*x.shape[:-1], out_features))


def _check_width(x: torch.Tensor, in_features: int) -> None:
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., {in_features}] (in_features), got {tuple(x.shape)}")


def check_inputs(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, backend: str) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"expected a lowbit.QuantizedWeight, got {type(qw).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _check_width(x, qw.in_features)
    if x.device != qw.device:
        raise ValueError(f"x is on {x.device} but the quantized weight is on {qw.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (qw.out_features,):
            raise ValueError(f"bias must be a tensor of shape ({qw.out_features},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """``x [..., in_features] @ W.T + bias -> [..., out_features]`` in x's dtype."""
    check_inputs(x, qw, bias, backend)
    return matmul_unchecked(x, qw, bias, backend)


def matmul_unchecked(x, qw: QuantizedWeight, bias, backend: str = "auto") -> torch.Tensor:
    return call(x, list(qw.packed), qw.scales, qw.zeros, qw.perm, bias, str(qw.scheme), qw.out_features,
                qw.in_features, str(qw.dtype).removeprefix("torch."), backend)


def call(x, packed, scales, zeros, perm, bias, scheme: str, out_features: int, in_features: int, weight_dtype: str,
         backend: str) -> torch.Tensor:
    """``torch.ops.lowbit.matmul`` (arguments as the op's), or its implementation directly in a plain
    eager call (:func:`_plain_eager`): the op is what tracers and torch.compile record, what autograd
    and functorch transforms meet, and what torch-function and dispatch modes, tensor subclasses, fake
    and meta tensors see."""
    args = (x, packed, scales, zeros, perm, bias, scheme, out_features, in_features, weight_dtype, backend)
    if _plain_eager((x, scales, zeros, perm, bias, *packed)):
        return _matmul_impl(*args)
    return torch.ops.lowbit.matmul(*args)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(tensors) -> bool:
    """No tracing, compiling, mode or functorch transform is active, and every tensor is a plain
    (or Parameter) non-meta tensor that autograd does not follow: nothing would see the op."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
            or torch._C._len_torch_function_stack() or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) in _PLAIN_TYPES and not t.is_meta and not (grad and t.requires_grad))
               for t in tensors)
