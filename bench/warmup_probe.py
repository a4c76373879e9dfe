"""Does a kernel's measured time depend on what the GPU did just before? Times the same CUDA graph
(int4-g128 / cuBLAS on the 70B gate_up layer, rotated weight copies) cold (right after host work),
after 100 ms of replays of itself, and after 100 ms of an unrelated fp16 matmul (clocks up, caches
and TLBs cold for these weights). Prints SM clocks as nvidia-smi reads them."""
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from lowbit.bench.common import clone_qweight, copies_for, random_qweight
from lowbit.kernels import dispatch

dev = torch.device("cuda")


def graph_of(calls):
    for f in calls:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    return g


def timed(g, n_calls, replays=25):
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / n_calls)
    return statistics.median(times)


def busy(fn, ms=100):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < ms / 1000:
        fn()
    torch.cuda.synchronize()


def clock():
    return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


big = torch.randn(8192, 8192, dtype=torch.float16, device=dev)
other = lambda: big @ big  # noqa: E731
for name in ("int4-g128", "cublas"):
    k, n, m = 8192, 57344, 1
    x = torch.randn(m, k, dtype=torch.float16, device=dev)
    if name == "cublas":
        w = torch.randn(n, k, dtype=torch.float16, device=dev)
        ws = [w] + [w.clone() for _ in range(copies_for(w.nbytes, dev) - 1)]
        calls = [lambda w=w: F.linear(x, w) for w in ws]
    else:
        qw = random_qweight(name, n, k, torch.float16, dev)
        qws = [qw] + [clone_qweight(qw) for _ in range(copies_for(qw.nbytes, dev) - 1)]
        calls = [lambda q=q: dispatch.matmul(x, q, None) for q in qws]
    calls = [calls[i % len(calls)] for i in range(max(8, len(calls)))]
    g = graph_of(calls)
    for trial in range(2):
        time.sleep(0.5)  # host work: the GPU idles
        cold = timed(g, len(calls))
        busy(g.replay)
        warm_self = timed(g, len(calls))
        time.sleep(0.5)
        busy(other)
        warm_other = timed(g, len(calls))
        print(f"{name} gate_up M=1 trial {trial}: cold {cold:.1f} us, after its own replays {warm_self:.1f}, "
              f"after another kernel {warm_other:.1f} ({clock()})", flush=True)
    del g
    torch.cuda.empty_cache()
