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

import contextlib
import itertools
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import sparsity as _sparsity
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


def _check_act_order(scheme: Scheme, act_order: bool) -> None:
    if act_order and scheme.sparsity:
        raise ValueError(f"act_order cannot be combined with {scheme}: its groups of four are consecutive inputs, "
                         "which a column permutation would break up; use act_order=False")


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _layer_hessian(inputs, hessian, in_features: int, device) -> torch.Tensor:
    """The float32 Hessian ``[in, in]`` on ``device``, from exactly one of ``inputs`` or ``hessian``."""
    if (inputs is None) == (hessian is None):
        raise ValueError("GPTQ needs exactly one of inputs [n, in_features] (calibration activations) "
                         "or hessian [in_features, in_features]")
    if hessian is not None:
        if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
            raise ValueError(f"hessian must be a floating-point tensor [{in_features}, {in_features}], "
                             f"got {_describe(hessian)}")
        if tuple(hessian.shape) != (in_features, in_features):
            raise ValueError(f"hessian must have shape [{in_features}, {in_features}] (in_features x in_features), "
                             f"got {tuple(hessian.shape)}")
        if not torch.isfinite(hessian).all():
            raise ValueError("hessian has inf or NaN values")
        return hessian.to(device=device, dtype=torch.float32, copy=True)
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise ValueError(f"inputs must be a floating-point tensor [n, {in_features}], got {_describe(inputs)}")
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

    ``inputs``: the layer's calibration activations ``[n, in_features]`` (or ``[..., in_features]``,
    any float dtype); or
    ``hessian``: a precomputed ``[in_features, in_features]`` ``2/n * X^T X`` (see
    :class:`HessianAccumulator`). ``damp`` adds ``damp * mean(diag(H))`` to the diagonal;
    ``block_size`` columns are updated at once between the lazy batch updates. Each group's
    scales come from its error-updated columns when the group starts (``clip_search`` as in RTN).
    ``act_order`` quantizes columns by descending ``diag(H)``: the result then holds the codes
    of ``W[:, perm]`` and its ``perm`` (groups are contiguous in that order).
    2:4 sparse schemes are pruned and quantized jointly, as SparseGPT does (no act-order).
    Runs in float32 on ``w``'s device and is deterministic.
    """
    scheme = Scheme.parse(scheme)
    check_weight(w)
    _check_options(damp, block_size)
    _check_act_order(scheme, act_order)
    h = _layer_hessian(inputs, hessian, w.shape[1], w.device)
    codes, keep, scales, zeros, perm = _gptq(w, scheme, h, clip_search, act_order, float(damp), block_size)
    return build(scheme, codes, scales, zeros, w.dtype, perm, keep)


def _gptq(w: torch.Tensor, scheme: Scheme, h: torch.Tensor, clip_search: bool, act_order: bool, damp: float,
          block_size: int):
    """GPTQ of a checked ``w`` with its Hessian ``h`` (float32, modified): codes ``[out, in]``, the 2:4
    keep mask ``[out, in]`` (None for dense schemes), stored scales and zero points ``[out, groups]``
    (zeros None if symmetric), perm (None without act-order)."""
    cols = w.to(torch.float32).T.contiguous()  # [in, out]: GPTQ walks the columns of W, keep each contiguous
    # A column whose input is always zero has no effect on the output: zero it, keep H invertible.
    diag = h.diagonal().clone()
    dead = diag == 0
    h[dead, dead] = 1.0
    cols[dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
        cols, h = cols[perm], h[perm][:, perm]
    with _one_thread_on_cpu(w.device):
        codes, keep, group_scales, group_zeros = _quantize_columns(cols, _inverse_hessian_factor(h, damp), scheme,
                                                                   w.dtype, clip_search, block_size)
    zeros = None if scheme.symmetric else torch.stack(group_zeros, dim=1)
    return codes.T, None if keep is None else keep.T, torch.stack(group_scales, dim=1), zeros, perm


def _quantize_columns(cols, hinv, scheme: Scheme, weight_dtype, clip_search: bool, block_size: int):
    """The GPTQ loop over ``cols`` (``W^T``, updated in place): codes ``[in, out]``, the 2:4 keep mask
    ``[in, out]`` (None for dense schemes) and, per group, the stored scales ``[out]`` and zero points
    ``[out]`` (None if symmetric). 2:4 sparse schemes prune as SparseGPT (Frantar & Alistarh, 2023):
    at every fourth column the mask of the next four is chosen (:func:`_keep_2of4`); a pruned entry
    becomes 0 and its error is spread over the later columns like a rounding error."""
    k, n = cols.shape
    codes = torch.empty(k, n, dtype=torch.uint8, device=cols.device)
    keep = torch.ones(k, n, dtype=torch.bool, device=cols.device) if scheme.sparsity else None
    group = k if scheme.per_channel else scheme.group_size
    group_scales, group_zeros = [], []  # per group: stored scales [out], zero points [out]
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        block = cols[b0:b1]  # updated in place
        block_err = torch.empty_like(block)
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:
                stored, scales, zeros = group_params(_updated_group(cols, block_err, hinv, b0, b1, col, group).T,
                                                     scheme, weight_dtype, clip_search)
                group_scales.append(stored[:, 0])
                scale, zero = scales[:, 0], None if zeros is None else zeros[:, 0]
                group_zeros.append(zero)
            if keep is not None and col % _sparsity.GROUP == 0:
                keep[col:col + _sparsity.GROUP] = _keep_2of4(cols, block_err, hinv, b0, b1, col)
            c = encode_codes(block[i], scheme, scale, zero)
            codes[col] = c
            q = decode_codes(c, scheme, scale, zero)
            if keep is not None:
                q = torch.where(keep[col], q, 0.0)
            err = (block[i] - q) / hinv[col, col]
            block[i + 1:].addr_(hinv[col, col + 1:b1], err, alpha=-1.0)
            block_err[i] = err
        cols[b1:].addmm_(hinv[b0:b1, b1:].T, block_err, alpha=-1.0)
    return codes, keep, group_scales, group_zeros


def _keep_2of4(cols, block_err, hinv, b0: int, b1: int, col: int) -> torch.Tensor:
    """SparseGPT's choice for columns ``col .. col+3`` (bool ``[<=4, out]``): each row keeps the two whose
    pruning would add the most output error, ``(w / hinv_diag)^2``, with every error so far applied to w."""
    ahead = _updated_group(cols, block_err, hinv, b0, b1, col, _sparsity.GROUP)
    diag = hinv.diagonal()[col:col + ahead.shape[0]]
    return _sparsity.keep_mask((ahead / diag[:, None]).square().T).T


def _updated_group(cols, block_err, hinv, b0: int, b1: int, col: int, group: int) -> torch.Tensor:
    """Columns ``col .. col+group`` (rows of ``cols``) with every error so far applied: those inside
    the current block ``b0..b1`` are up to date; those past it still lack this block's pending update."""
    end = min(col + group, cols.shape[0])
    if end <= b1:
        return cols[col:end]
    beyond = cols[b1:end] - hinv[b0:col, b1:end].T @ block_err[:col - b0]
    return torch.cat([cols[col:b1], beyond])


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device):
    """GPTQ's operations are small (one column, or a Hessian of in_features^2): on CPU, worker
    threads only add synchronisation (and stall badly when the cores are shared), so use one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
        raise ValueError("calibration must be a LongTensor [n_seq, seq_len] of token ids, "
                         f"got {_describe(calibration)}")
    if calibration.numel() == 0:
        raise ValueError(f"calibration is empty: shape {tuple(calibration.shape)}")


def _module_device(module: nn.Module) -> torch.device:
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if first is None else first.device


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


def _run_layer(layer, batches, weights: dict[str, torch.Tensor] | None = None):
    """Outputs of ``layer`` for each captured batch (the next layer's hidden states), with its
    parameters named in ``weights`` replaced by those tensors."""
    outs = []
    for hidden, args, kwargs in batches:
        out = torch.func.functional_call(layer, weights or {}, (hidden, *args), kwargs, strict=False)
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


def _same_hessian_groups(linears: dict[str, nn.Linear], accumulators: dict[str, HessianAccumulator]):
    """Names of linears grouped by identical Hessian (they read the same input, as q/k/v and gate/up)
    and weight dtype: GPTQ treats rows independently, so one pass over their stacked rows does them all."""
    groups: list[list[str]] = []
    for name, linear in linears.items():
        for group in groups:
            first = group[0]
            if linears[first].weight.dtype == linear.weight.dtype and torch.equal(accumulators[first].sum,
                                                                                  accumulators[name].sum):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _gptq_linears(names, linears, accumulator, scheme, clip_search, act_order, damp, block_size, dtype):
    """GPTQ of the linears ``names`` (sharing one Hessian): a QuantLinear for each, of ``dtype``
    (None: their weights' dtype)."""
    from ..nn import QuantLinear

    h = accumulator.hessian
    if not torch.isfinite(h).all():
        raise ValueError(f"the calibration inputs of {names} have inf or NaN values")
    w = torch.cat([linears[name].weight.detach() for name in names])
    if dtype is not None:  # rounded as RTN of weights of that dtype would be: the scales are stored in it too
        w = w.to(dtype)
    check_weight(w)
    codes, keep, scales, zeros, perm = _gptq(w, scheme, h, clip_search, act_order, damp, block_size)
    quantized, row = {}, 0
    for name in names:
        linear = linears[name]
        rows = slice(row, row + linear.out_features)
        row = rows.stop
        qw = build(scheme, codes[rows], scales[rows], None if zeros is None else zeros[rows], w.dtype,
                   None if perm is None else perm.clone(),  # own copy: checkpoints refuse shared tensors
                   None if keep is None else keep[rows])
        quantized[name] = QuantLinear.from_qweight(qw, linear.bias)
    return quantized


def quantize_model_gptq(model: nn.Module, scheme, calibration: torch.Tensor, *, exclude: Iterable[str] = ("lm_head",),
                        act_order: bool = False, clip_search: bool = False, damp: float = 0.01,
                        block_size: int = 128, progress: bool = True, device=None,
                        batch_size: int = 8, dtype: torch.dtype | None = None) -> nn.Module:
    """Quantize a Hugging Face decoder model (LLaMA-like) with GPTQ, in place, one block at a time.

    ``calibration``: token ids ``[n_seq, seq_len]``. The inputs of the first decoder layer are
    captured once; then each layer in turn is moved to ``device`` (default: where the embeddings
    are), run over the calibration batches (``batch_size`` sequences) to accumulate the Hessians
    of its ``nn.Linear`` inputs, its linears are quantized with :func:`quantize_gptq` and replaced
    by :class:`lowbit.QuantLinear`, and it is run again so the next layer sees the *quantized*
    layer's outputs; then it goes back where it was. ``exclude`` is as in :func:`lowbit.quantize_model`;
    linears outside the decoder layers (``lm_head``) must be excluded. ``dtype``: the quantized
    linears' weight dtype, which fixes their scales' storage dtype as in RTN (default: each
    linear's own; e.g. float16 for a float32 model calibrated on CPU but stored as float16).
    """
    from ..nn import quantized_linears

    scheme = Scheme.parse(scheme)
    _check_calibration(calibration)
    _check_options(damp, block_size)
    _check_act_order(scheme, act_order)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if dtype not in (None, torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be None, torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
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
    # What runs before the first layer: the embeddings and the rotary position embeddings.
    front = [m for m in (decoder.embed_tokens, getattr(decoder, "rotary_emb", None)) if m is not None]
    front_homes = [_module_device(m) for m in front]
    with torch.no_grad():
        for m in front:
            m.to(device)
        batches = _capture_first_layer_inputs(decoder, calibration, device, batch_size)
        for m, home in zip(front, front_homes):
            m.to(home)
        for layer in tqdm(decoder.layers, desc=f"GPTQ {scheme}", disable=not progress, unit="layer"):
            home = _module_device(layer)
            layer.to(device)
            linears = {name: m for name, m in layer.named_modules() if id(m) in target_ids}
            accumulators = _collect_hessians(layer, linears, batches, device)
            quantized = {}
            for names in _same_hessian_groups(linears, accumulators):
                quantized.update(_gptq_linears(names, linears, accumulators[names[0]], scheme, clip_search,
                                               act_order, float(damp), block_size, dtype))
            # The next layer sees this one's quantized outputs; its weights are dequantized once, not per batch.
            outs = _run_layer(layer, batches, {f"{name}.weight": q.qweight.dequantize(linears[name].weight.dtype)
                                               for name, q in quantized.items()})
            for name, q in quantized.items():
                parent_name, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent_name) if parent_name else layer, child, q)
            batches = [(out, args, kwargs) for out, (_, args, kwargs) in zip(outs, batches)]
            layer.to(home)
    model.train(was_training)
    return model
