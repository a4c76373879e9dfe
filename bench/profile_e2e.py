"""Where a decode step of `lowbit bench e2e` spends its time: GPU time per kernel over a few decode
steps (torch.profiler sees the kernels inside the CUDA graphs), grouped into lowbit matmuls, cuBLAS,
attention and the rest, and the step's wall time against its summed kernel time (the gap is time the
GPU waits on the CPU or on launches; the two come from separate loops, so a gap near zero can come
out slightly negative).

    python bench/profile_e2e.py MODEL BATCH MODE SCHEME [SCHEME ...]     (MODE: compile, graph or prefill)

MODE prefill profiles the eager 128-token prefill instead (the benchmark's prefill time; each one
after emptying the cache, whose zeroing kernels count as "other"): wall time against GPU kernel time
says whether it waits on Python or on kernels.
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

from lowbit.bench.e2e import MODELS, WARMUP_STEPS, _decode_step, _free, build_model, model_config

STEPS = 20
# First match wins: attention kernels' names carry cutlass templates, and inductor's fused elementwise
# kernels around attention carry "attention" (they count as "other").
GROUPS = (("lowbit matmul", ("lowbit_matmul", "lowbit_dequant")), ("other", ("triton_poi", "triton_red", "triton_per")),
          ("attention", ("flash", "fmha", "sdpa", "attention")), ("cuBLAS gemm", ("gemm", "gemv", "nvjet", "sm90_xmma", "cublas")))


def group_of(kernel: str) -> str:
    return next((g for g, keys in GROUPS if any(k in kernel.lower() for k in keys)), "other")


@torch.inference_mode()
def profile_scheme(name: str, scheme: str, batch: int, mode: str) -> None:
    model = build_model(name, scheme, "cuda")
    config = model_config(name)
    prompt = torch.randint(0, config.vocab_size, (batch, 128), device="cuda")
    cache = StaticCache(config, max_cache_len=128 + WARMUP_STEPS + 2 * STEPS + 2)

    def prefill():
        return model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    tokens = prefill()
    if mode == "prefill":  # the same prefill again, on an emptied cache (it would append otherwise)
        def advance(_):
            cache.reset()
            return prefill()
    else:
        def advance(last, decode=_decode_step(model, cache, mode)):  # the only reference to the step
            return decode(last)[:, -1:].argmax(-1)
    for _ in range(WARMUP_STEPS):
        tokens = advance(tokens)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        tokens = advance(tokens)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / STEPS * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            tokens = advance(tokens)
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / STEPS / 1e3, e.count / STEPS) for e in prof.key_averages()
               if e.device_time_total > 0]
    busy = sum(t for _, t, _ in kernels)
    print(f"\n## {name} {scheme} batch {batch} ({mode}): wall {wall_ms:.3f} ms/step, kernels {busy:.3f} ms/step, "
          f"{sum(c for *_, c in kernels):.0f} kernels/step")
    by_group = {}
    for kernel, t, count in kernels:
        g = by_group.setdefault(group_of(kernel), [0.0, 0.0])
        g[0], g[1] = g[0] + t, g[1] + count
    for g, (t, count) in sorted(by_group.items(), key=lambda kv: -kv[1][0]):
        print(f"  {g:14s} {t:7.3f} ms  {count:5.0f} kernels  {t / max(count, 1) * 1e3:7.1f} us each")
    for kernel, t, count in sorted(kernels, key=lambda k: -k[1])[:12]:
        print(f"    {t:7.3f} ms {count:5.0f}x  {kernel[:110]}")
    del model, advance, cache
    _free(torch.device("cuda"))


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] not in MODELS or not sys.argv[2].isdigit() or \
            sys.argv[3] not in ("compile", "graph", "prefill"):
        sys.exit(f"{__doc__}\nMODEL: one of {', '.join(MODELS)}")
    model_name, batch_size, decode_mode, *schemes = sys.argv[1:]
    for s in schemes:
        profile_scheme(model_name, s, int(batch_size), decode_mode)
