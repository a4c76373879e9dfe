"""Time GPTQ of a SmolLM2-135M-shaped model on the GPU (random weights and calibration tokens:
the embedded model's GGUF file is too large to carry to the lent machine, and GPTQ's work depends
only on the shapes and the calibration size).

    python bench/gptq_gpu_time.py --schemes int4-g128 fp6_e3m2-channel --json gptq_gpu.json
"""
import argparse
import json
import time

import torch
from transformers import LlamaForCausalLM

from lowbit.bench.common import run_metadata
from lowbit.bench.e2e import model_config
from lowbit.quantize.gptq import quantize_model_gptq


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--schemes", nargs="+", default=["int4-g128"])
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json")
    a = p.parse_args()
    rows = []
    for scheme in a.schemes:
        torch.manual_seed(0)
        model = LlamaForCausalLM(model_config("smollm2-135m")).to(device="cuda", dtype=torch.float16).eval()
        tokens = torch.randint(0, model.config.vocab_size, (a.sequences, a.seq_len), device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        quantize_model_gptq(model, scheme, tokens, progress=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"scheme": scheme, "method": "gptq", "quantize_s": seconds, "calibration": [a.sequences, a.seq_len]})
        print(f"GPTQ {scheme} on {torch.cuda.get_device_name()}: {seconds:.1f} s "
              f"({a.sequences} x {a.seq_len} calibration tokens)", flush=True)
        del model
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**run_metadata("cuda"), "kind": "gptq-time", "model": "smollm2-135m shape, random weights",
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
