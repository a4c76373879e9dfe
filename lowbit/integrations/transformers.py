"""Hugging Face transformers integration: ``quant_method: "lowbit"`` for ``from_pretrained``.

Importing this module (``import lowbit`` does) registers ``lowbit`` with transformers as soon as
transformers loads its quantizers, see :func:`register_when_transformers_loads`. Then:

* ``AutoModelForCausalLM.from_pretrained(lowbit_dir)`` loads a lowbit checkpoint: its
  ``config.json`` names the quantized modules, which are swapped for :class:`lowbit.QuantLinear`
  on the meta device before loading, so the checkpoint keys load with no conversion.
* ``from_pretrained(fp_dir, quantization_config=LowbitConfig(scheme="int4-g32"))`` quantizes a
  float checkpoint while loading (every ``nn.Linear`` but ``modules_to_not_convert``).
* ``save_pretrained`` writes a lowbit checkpoint (``lowbit.load_quantized`` reads it too).

``LowbitConfig`` and ``LowbitHfQuantizer`` subclass transformers' classes, so they are built on
first use: importing this module does not import transformers.
"""

from __future__ import annotations

import copy
import functools
import importlib.abc
import importlib.util
import sys
import warnings

import torch
from torch import nn

from .. import pack as _pack
from ..io.checkpoint import SHA256_PREFIX, _quantization_config, tensor_sha256
from ..nn import QuantLinear, check_unfused, quantize_model
from ..scheme import Scheme

__all__ = ["LowbitConfig", "LowbitHfQuantizer", "register", "register_when_transformers_loads", "QUANT_METHOD"]

QUANT_METHOD = "lowbit"
FORMAT_VERSION = 1
# Only round-to-nearest needs no calibration data, so it is the only method usable while loading.
LOAD_TIME_METHODS = ("rtn",)
# The module holding transformers' registry of quantization methods.
_REGISTRY_MODULE = "transformers.quantizers.auto"


def replace_with_empty_quant_linears(model: nn.Module, modules: dict[str, dict]) -> None:
    """Swap each listed ``nn.Linear`` for a meta-device QuantLinear whose buffers match the checkpoint keys."""
    for name, meta in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint quantizes {name!r}, which this model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"the checkpoint quantizes {name!r}, which is a {type(linear).__name__}, not nn.Linear")
        if [linear.out_features, linear.in_features] != list(meta["shape"]):
            raise ValueError(f"{name}: checkpoint shape {meta['shape']} != model's "
                             f"[{linear.out_features}, {linear.in_features}]")
        quant = QuantLinear(linear.in_features, linear.out_features, meta["scheme"], bias=linear.bias is not None,
                            dtype=getattr(torch, meta["dtype"]), device="meta", act_order=bool(meta["act_order"]))
        model.set_submodule(name, quant)


def tied_module_names(model: nn.Module) -> list[str]:
    """Modules whose weight is tied to another (e.g. lm_head to the embeddings): quantizing one would untie them."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return [key.removesuffix(".weight") for pair in tied.items() for key in pair]


@functools.cache
def _classes():
    # Submodules, not the package: this also runs while transformers.quantizers is being imported.
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LowbitConfig(QuantizationConfigMixin):
        """``quantization_config`` of a lowbit model, as written to ``config.json``.

        To quantize while loading, give ``scheme`` (and optionally ``modules_to_not_convert``,
        ``clip_search``). A loaded or saved checkpoint's config also lists ``modules``:
        ``{qualified_name: {"scheme", "shape": [out, in], "dtype", "act_order"}}``.
        """

        def __init__(self, scheme: str = "int4-g128", modules_to_not_convert: list[str] | None = None,
                     method: str = "rtn", clip_search: bool = False, modules: dict[str, dict] | None = None,
                     format_version: int = FORMAT_VERSION, layout: str = _pack.LAYOUT,
                     quant_method: str = QUANT_METHOD):
            if quant_method != QUANT_METHOD:
                raise ValueError(f"LowbitConfig is for quant_method {QUANT_METHOD!r}, got {quant_method!r}")
            if format_version != FORMAT_VERSION:
                raise ValueError(f"lowbit checkpoint format_version {format_version} is not supported "
                                 f"(this lowbit reads version {FORMAT_VERSION})")
            if layout != _pack.LAYOUT:
                raise ValueError(f"lowbit layout {layout!r} is not supported (expected {_pack.LAYOUT!r})")
            if method not in LOAD_TIME_METHODS:
                raise ValueError(f"method {method!r} cannot run inside from_pretrained (it needs calibration data); "
                                 f"use one of {LOAD_TIME_METHODS}, or quantize with lowbit and save the checkpoint")
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.layout = layout
            self.scheme = str(Scheme.parse(scheme))
            self.modules_to_not_convert = (["lm_head"] if modules_to_not_convert is None
                                           else list(modules_to_not_convert))
            self.method = method
            self.clip_search = bool(clip_search)
            self.modules = dict(modules or {})
            for meta in self.modules.values():
                Scheme.parse(meta["scheme"])  # fail on a malformed checkpoint before any module is built

        def to_dict(self) -> dict:
            return {"quant_method": self.quant_method, "format_version": self.format_version, "layout": self.layout,
                    "scheme": self.scheme, "modules": copy.deepcopy(self.modules),
                    "modules_to_not_convert": list(self.modules_to_not_convert), "method": self.method,
                    "clip_search": self.clip_search}

    class LowbitHfQuantizer(HfQuantizer):
        requires_calibration = False

        def _process_model_before_weight_loading(self, model, **kwargs):
            if self.pre_quantized:
                replace_with_empty_quant_linears(model, self.quantization_config.modules)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            # Quantizing whole loaded layers (rather than tensor by tensor in a ConversionOps) leaves
            # the float checkpoint's names and loading untouched, at the cost of holding the float
            # model once during loading.
            if not self.pre_quantized:
                cfg = self.quantization_config
                exclude = [*cfg.modules_to_not_convert, *(model._keep_in_fp32_modules or ()),
                           *tied_module_names(model)]
                with torch.no_grad():
                    quantize_model(model, cfg.scheme, exclude=exclude, progress=False, method=cfg.method,
                                   clip_search=cfg.clip_search)
                # A new config (the caller's stays as given), describing the layers as save_quantized does.
                self.quantization_config = LowbitConfig(**{**cfg.to_dict(), **_quantization_config(model)})
                model.config.quantization_config = self.quantization_config
            return model

        def get_state_dict_and_metadata(self, model):
            check_unfused(model)
            # The SHA-256 of every tensor, as lowbit.save_quantized writes them, so that
            # lowbit.load_quantized reads what save_pretrained wrote.
            metadata = {SHA256_PREFIX + k: tensor_sha256(t.to("cpu")) for k, t in model.state_dict().items()}
            return None, metadata

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    LowbitConfig.__qualname__, LowbitHfQuantizer.__qualname__ = "LowbitConfig", "LowbitHfQuantizer"  # picklable
    return LowbitConfig, LowbitHfQuantizer


def __getattr__(name: str):
    if name in ("LowbitConfig", "LowbitHfQuantizer"):
        return dict(zip(("LowbitConfig", "LowbitHfQuantizer"), _classes()))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Make ``quant_method: "lowbit"`` known to transformers; any number of calls (transformers
    itself raises on a second registration)."""
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)

    config_class, quantizer_class = _classes()
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(config_class)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(quantizer_class)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers' quantizer registry is first imported, it wraps
    that module's loading so that :func:`register` runs right after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                try:
                    register()
                except Exception as e:  # an incompatible transformers must still import
                    warnings.warn(f"lowbit could not register its quantizer with transformers: {e!r}")

            spec.loader.exec_module = exec_then_register
        return spec


def register_when_transformers_loads() -> None:
    """Register with transformers now if its quantizer registry is loaded, else as soon as it is:
    ``import lowbit`` stays free of transformers' import time, and the order of imports does not matter."""
    if _REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


register_when_transformers_loads()
