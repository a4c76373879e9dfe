"""Does a kernel's measured time depend on what the GPU did just before? Times the same CUDA graph
(int4-g128 / cuBLAS on the 70B gate_up layer, rotated weight copies) cold (right after host work),
after 100 ms of replays of itself, and after 100 ms of an unrelated fp16 matmul (clocks up, caches
and TLBs cold for these weights). Prints SM clocks as nvidia-smi reads them. (Session 9 measured it
with its own copy of the capture and timing loop; it now uses ``graph_time_us``, whose capture first
calls each closure once.)"""
import subprocess
import time

import torch
import torch.nn.functional as F

from lowbit.bench.common import copies_for, graph_time_us, random_qweight, rotated_copies
from lowbit.kernels import dispatch

dev = torch.device("cuda")


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
        qws = rotated_copies(qw)
        calls = [lambda q=q: dispatch.matmul(x, q, None) for q in qws]
    for trial in range(2):
        time.sleep(0.5)  # host work: the GPU idles
        cold = graph_time_us(calls, settle_ms=0)
        warm_self = graph_time_us(calls)  # after 100 ms of its own replays
        time.sleep(0.5)
        busy(other)
        warm_other = graph_time_us(calls, settle_ms=0)
        print(f"{name} gate_up M=1 trial {trial}: cold {cold:.1f} us, after its own replays {warm_self:.1f}, "
              f"after another kernel {warm_other:.1f} ({clock()})", flush=True)
    torch.cuda.empty_cache()
