"""lowbit: low-bit LLM weights at the speed of their bytes.

    qw = lowbit.quantize(weight, "int4-g128")      # QuantizedWeight
    y = lowbit.matmul(x, qw, bias)                  # x @ W.T + bias
    lowbit.quantize_model(model, "fp6_e3m2-channel")
    lowbit.fuse_projections(model)                  # q/k/v and gate/up as one linear each (inference)
    lowbit.save_quantized(model, "out/"); model = lowbit.load_quantized("out/")
"""

from . import formats, pack
from .nn import QuantLinear, fuse_projections, quantize_model
from .ops import matmul
from .qweight import QuantizedWeight
from .quantize import quantize
from .scheme import Scheme
from .integrations import transformers as _transformers  # noqa: F401  registers quant_method "lowbit" once transformers loads

__version__ = "0.1.0"

_LAZY = {
    "save_quantized": ("lowbit.io.checkpoint", "save_quantized"),
    "load_quantized": ("lowbit.io.checkpoint", "load_quantized"),
    "LowbitConfig": ("lowbit.integrations.transformers", "LowbitConfig"),
}

__all__ = ["Scheme", "QuantizedWeight", "quantize", "matmul", "QuantLinear", "quantize_model", "fuse_projections",
           "formats", "pack",
           *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
