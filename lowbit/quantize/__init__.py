"""Quantizers: round-to-nearest (with optional clipping search) and GPTQ."""

from __future__ import annotations

import torch

from ..qweight import QuantizedWeight
from ..scheme import Scheme

__all__ = ["quantize", "METHODS"]

METHODS = ("rtn", "gptq")


def check_weight(w) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"weight dtype must be float16, bfloat16 or float32, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"weight is empty: shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight has inf or NaN values")


def quantize(w: torch.Tensor, scheme, method: str = "rtn", *, clip_search: bool = False,
             inputs: torch.Tensor | None = None, **gptq_options) -> QuantizedWeight:
    """Quantize ``w [out_features, in_features]`` under ``scheme`` (a Scheme or a string like 'int4-g128').

    ``method="rtn"``: round to nearest; ``clip_search=True`` shrinks each group's range to the
    ratio that minimizes its reconstruction error. ``method="gptq"``: needs ``inputs``, the
    layer's calibration inputs ``[n, in_features]`` (see :func:`lowbit.quantize.gptq.quantize_gptq`).
    2:4 sparse schemes (``"int4-g128-2:4"``) prune two of every four inputs: by magnitude with RTN,
    by SparseGPT's output-error criterion, jointly with the rounding, with GPTQ.
    """
    scheme = Scheme.parse(scheme)
    check_weight(w)
    if method == "rtn":
        if inputs is not None or gptq_options:
            raise ValueError("method='rtn' takes no calibration inputs or GPTQ options")
        from .rtn import quantize_rtn

        return quantize_rtn(w, scheme, clip_search=clip_search)
    if method == "gptq":
        if inputs is None and gptq_options.get("hessian") is None:
            raise ValueError("method='gptq' needs inputs=X, the layer's calibration inputs [n, in_features], "
                             "or hessian=H [in_features, in_features]")
        from .gptq import quantize_gptq

        return quantize_gptq(w, scheme, inputs, clip_search=clip_search, **gptq_options)
    raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
