"""GPTQ (Frantar et al., 2022): quantize a weight column by column and fold each column's rounding
error into the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs,
so that the layer's *output* error is minimized rather than its weight error.

Rounding uses lowbit's own grid (``rtn.group_params``, ``encode_codes``, ``decode_codes``), so
every integer and floating format and every scale kind (group, per-channel, mx) works unchanged.

* :func:`quantize_gptq`: one weight, from its calibration inputs or a precomputed Hessian.
* :class:`HessianAccumulator`: ``H = 2/n * X^T X`` over batches of inputs.
* :func:`quantize_model_gptq`: a Hugging Face decoder model, one block at a time.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..qweight import QuantizedWeight
from ..scheme import Scheme
from . import check_weight
from .rtn import build, decode_codes, encode_codes, group_params

__all__ = ["quantize_gptq", "quantize_model_gptq", "HessianAccumulator"]


class HessianAccumulator:
    """Accumulates ``H = 2/n * X^T X`` (float32, on ``device``) over batches of inputs ``[..., in_features]``."""

    def __init__(self, in_features: int, device=None):
        self.in_features = int(in_features)
        self.sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs must have shape [..., {self.in_features}] (in_features), got {tuple(x.shape)}")
        x = x.reshape(-1, self.in_features).to(device=self.sum.device, dtype=torch.float32)
        self.add_product(x.T @ x, x.shape[0])

    def add_product(self, xtx: torch.Tensor, rows: int) -> None:
        """Add a precomputed ``X^T X`` of ``rows`` input rows (lets linears that share an input share the matmul)."""
        self.sum += xtx
        self.rows += int(rows)

    @property
    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("no calibration inputs were accumulated: the Hessian is undefined")
        return self.sum * (2.0 / self.rows)


def _check_options(damp, block_size) -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"damp must be a non-negative number (a fraction of mean(diag(H))), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _layer_hessian(inputs, hessian, in_features: int, device) -> torch.Tensor:
    """The float32 Hessian ``[in, in]`` on ``device``, from exactly one of ``inputs`` or ``hessian``."""
    if (inputs is None) == (hessian is None):
        raise ValueError("GPTQ needs exactly one of inputs [n, in_features] (calibration activations) "
                         "or hessian [in_features, in_features]")
    if hessian is not None:
        if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
            raise ValueError(f"hessian must be a floating-point tensor [{in_features}, {in_features}], "
                             f"got {type(hessian).__name__}" + (f" {hessian.dtype}" if isinstance(hessian, torch.Tensor) else ""))
        if tuple(hessian.shape) != (in_features, in_features):
            raise ValueError(f"hessian must have shape [{in_features}, {in_features}] (in_features x in_features), "
                             f"got {tuple(hessian.shape)}")
        if not torch.isfinite(hessian).all():
            raise ValueError("hessian has inf or NaN values")
        return hessian.to(device=device, dtype=torch.float32, copy=True)
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise ValueError(f"inputs must be a floating-point tensor [n, {in_features}], got {type(inputs).__name__}"
                         + (f" {inputs.dtype}" if isinstance(inputs, torch.Tensor) else ""))
    if inputs.dim() < 2 or inputs.shape[-1] != in_features or inputs.numel() == 0:
        raise ValueError(f"inputs must have shape [n, {in_features}] (n >= 1 calibration rows of in_features), "
                         f"got {tuple(inputs.shape)}")
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs have inf or NaN values")
    acc = HessianAccumulator(in_features, device)
    acc.add(inputs)
    return acc.hessian


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``: row ``i`` right of the diagonal
    is how column ``i``'s error spreads over the later columns."""
    h = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if info.item() == 0:
            return upper
    raise ValueError(f"the Hessian is not positive definite even after dampening by damp={damp}: "
                     "increase damp or give more calibration inputs")


def quantize_gptq(w: torch.Tensor, scheme, inputs: torch.Tensor | None = None, *, clip_search: bool = False,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize ``w [out_features, in_features]`` under ``scheme`` with GPTQ.

    ``inputs``: the layer's calibration activations ``[n, in_features]`` (any float dtype); or
    ``hessian``: a precomputed ``[in_features, in_features]`` ``2/n * X^T X`` (see
    :class:`HessianAccumulator`). ``damp`` adds ``damp * mean(diag(H))`` to the diagonal;
    ``block_size`` columns are updated at once between the lazy batch updates. Each group's
    scales come from its error-updated columns when the group starts (``clip_search`` as in RTN).
    ``act_order`` quantizes columns by descending ``diag(H)``: the result then holds the codes
    of ``W[:, perm]`` and its ``perm`` (groups are contiguous in that order).
    Runs in float32 on ``w``'s device and is deterministic.
    """
    scheme = Scheme.parse(scheme)
    check_weight(w)
    if scheme.sparsity is not None:
        raise NotImplementedError(f"{scheme}: 2:4 sparse quantization is not implemented yet")
    _check_options(damp, block_size)
    n, k = w.shape
    h = _layer_hessian(inputs, hessian, k, w.device)
    w32 = w.to(torch.float32).clone()

    # A column whose input is always zero has no effect on the output: zero it, keep H invertible.
    diag = h.diagonal().clone()
    dead = diag == 0
    h[dead, dead] = 1.0
    w32[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
        w32, h = w32[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, float(damp))

    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    if scheme.per_channel:
        stored, col_scale, col_zero = group_params(w32, scheme, w.dtype, clip_search)
        group = k
    else:
        group = scheme.group_size
        num_groups = -(-k // group)
        stored = zeros = None
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        block = w32[:, b0:b1].clone()
        block_err = torch.zeros_like(block)
        for i in range(b1 - b0):
            col = b0 + i
            if not scheme.per_channel and col % group == 0:
                g_stored, col_scale, col_zero = group_params(
                    _updated_group(w32, block, block_err, hinv, b0, i, group), scheme, w.dtype, clip_search)
                if stored is None:
                    stored = g_stored.new_empty(n, num_groups)
                    zeros = None if col_zero is None else col_zero.new_empty(n, num_groups)
                stored[:, col // group] = g_stored[:, 0]
                if zeros is not None:
                    zeros[:, col // group] = col_zero[:, 0]
            c = encode_codes(block[:, i:i + 1], scheme, col_scale, col_zero)
            codes[:, col] = c[:, 0]
            err = (block[:, i] - decode_codes(c, scheme, col_scale, col_zero)[:, 0]) / hinv[col, col]
            block[:, i + 1:].addr_(err, hinv[col, col + 1:b1], alpha=-1.0)
            block_err[:, i] = err
        w32[:, b1:].addmm_(block_err, hinv[b0:b1, b1:], alpha=-1.0)
    if scheme.per_channel:
        zeros = col_zero
    return build(scheme, codes, stored, zeros, w.dtype, perm)


def _updated_group(w32, block, block_err, hinv, b0: int, i: int, group: int) -> torch.Tensor:
    """Columns ``b0+i .. b0+i+group`` with every error so far applied: those inside the current
    block are up to date in ``block``; those past it still lack this block's pending update."""
    b1 = b0 + block.shape[1]
    end = min(b0 + i + group, w32.shape[1])
    inside = block[:, i:min(i + group, block.shape[1])]
    if end <= b1:
        return inside
    beyond = w32[:, b1:end] - block_err[:, :i] @ hinv[b0:b0 + i, b1:end]
    return torch.cat([inside, beyond], dim=1)


# -- whole models ------------------------------------------------------------------------------

class _LayerInputsCaptured(ValueError):
    """Raised by the hook on the first decoder layer once its inputs are recorded, to stop the forward."""


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {key: _to(v, device) for key, v in obj.items()}
    return obj


def _check_calibration(calibration) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.dtype != torch.int64 or calibration.dim() != 2:
        raise ValueError("calibration must be a LongTensor [n_seq, seq_len] of token ids, got "
                         + (f"{calibration.dtype} {tuple(calibration.shape)}" if isinstance(calibration, torch.Tensor)
                            else type(calibration).__name__))
    if calibration.numel() == 0:
        raise ValueError(f"calibration is empty: shape {tuple(calibration.shape)}")


def _decoder(model: nn.Module) -> nn.Module:
    decoder = getattr(model, "model", model)
    if not (isinstance(getattr(decoder, "layers", None), nn.ModuleList) and hasattr(decoder, "embed_tokens")):
        raise ValueError("quantize_model_gptq expects a Hugging Face decoder model with model.model.embed_tokens "
                         f"and model.model.layers (LLaMA-like), got {type(model).__name__}")
    return decoder


def _capture_first_layer_inputs(decoder, calibration, device, batch_size):
    """Per calibration batch: (hidden states, other positional args, keyword args) of layer 0, on ``device``."""
    captured = []

    def record(module, args, kwargs):
        captured.append(_to((args[0] if args else kwargs.pop("hidden_states"), args[1:], kwargs), device))
        raise _LayerInputsCaptured

    hook = decoder.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            try:
                decoder(input_ids=batch.to(device), use_cache=False)
            except _LayerInputsCaptured:
                pass
    finally:
        hook.remove()
    return captured


def _run_layer(layer, batches):
    """Outputs of ``layer`` for each captured batch (the next layer's hidden states)."""
    outs = []
    for hidden, args, kwargs in batches:
        out = layer(hidden, *args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def _collect_hessians(layer, linears: dict[str, nn.Linear], batches, device) -> dict[str, HessianAccumulator]:
    """Run ``layer`` over every batch, accumulating the Hessian of each linear's input."""
    accumulators = {name: HessianAccumulator(m.in_features, device) for name, m in linears.items()}
    products = []  # (input, X^T X) of this batch: q/k/v and gate/up read the same tensor, multiply it once

    def hook_for(name):
        def accumulate(module, args, output):
            x = args[0]
            xtx = next((p for seen, p in products if seen is x), None)
            if xtx is None:
                x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
                xtx = x2.T @ x2
                products.append((x, xtx))
            accumulators[name].add_product(xtx, x.numel() // x.shape[-1])
        return accumulate

    hooks = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    try:
        for batch in batches:
            _run_layer(layer, [batch])
            products.clear()
    finally:
        for h in hooks:
            h.remove()
    return accumulators


def quantize_model_gptq(model: nn.Module, scheme, calibration: torch.Tensor, *, exclude: Iterable[str] = ("lm_head",),
                        act_order: bool = False, clip_search: bool = False, damp: float = 0.01,
                        block_size: int = 128, progress: bool = True, device=None,
                        batch_size: int = 8) -> nn.Module:
    """Quantize a Hugging Face decoder model (LLaMA-like) with GPTQ, in place, one block at a time.

    ``calibration``: token ids ``[n_seq, seq_len]``. The inputs of the first decoder layer are
    captured once; then each layer in turn is moved to ``device`` (default: where the embeddings
    are), run over the calibration batches (``batch_size`` sequences) to accumulate the Hessians
    of its ``nn.Linear`` inputs, its linears are quantized with :func:`quantize_gptq` and replaced
    by :class:`lowbit.QuantLinear`, and it is run again so the next layer sees the *quantized*
    layer's outputs; then it goes back where it was. ``exclude`` is as in :func:`lowbit.quantize_model`;
    linears outside the decoder layers (``lm_head``) must be excluded.
    """
    from ..nn import QuantLinear, quantized_linears

    scheme = Scheme.parse(scheme)
    _check_calibration(calibration)
    _check_options(damp, block_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    decoder = _decoder(model)
    targets = quantized_linears(model, exclude)
    in_layers = {id(m) for m in decoder.layers.modules()}
    outside = [name for name, m in targets if id(m) not in in_layers]
    if outside:
        raise ValueError(f"GPTQ quantizes the linears of the decoder layers only; exclude {outside} "
                         "(or quantize them afterwards with lowbit.quantize_model)")
    target_ids = {id(m) for _, m in targets}
    device = torch.device(device) if device is not None else decoder.embed_tokens.weight.device

    was_training = model.training
    model.eval()
    front = [m for m in (decoder.embed_tokens, getattr(decoder, "rotary_emb", None)) if m is not None]
    front_devices = [next(m.parameters(), next(m.buffers(), None)) for m in front]
    with torch.no_grad():
        for m in front:
            m.to(device)
        batches = _capture_first_layer_inputs(decoder, calibration, device, batch_size)
        for m, t in zip(front, front_devices):
            if t is not None:
                m.to(t.device)
        for layer in tqdm(decoder.layers, desc=f"GPTQ {scheme}", disable=not progress, unit="layer"):
            home = next(layer.parameters()).device
            layer.to(device)
            linears = {name: m for name, m in layer.named_modules() if id(m) in target_ids}
            accumulators = _collect_hessians(layer, linears, batches, device)
            for name, linear in linears.items():
                h = accumulators[name].hessian
                if not torch.isfinite(h).all():
                    raise ValueError(f"the calibration inputs of {name} have inf or NaN values")
                qw = quantize_gptq(linear.weight, scheme, hessian=h, clip_search=clip_search, act_order=act_order,
                                   damp=damp, block_size=block_size)
                parent_name, _, child = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                setattr(parent, child, QuantLinear.from_qweight(qw, linear.bias))
                del accumulators[name]
            outs = _run_layer(layer, batches)
            batches = [(out, args, kwargs) for out, (_, args, kwargs) in zip(outs, batches)]
            layer.to(home)
    model.train(was_training)
    return model
