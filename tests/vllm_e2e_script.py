"""Greedy generation with vLLM from a lowbit checkpoint, for tests/test_integration_vllm.py.

Runs in a Python that has vLLM and lowbit (whose entry point vLLM loads the plugin from):

    python tests/vllm_e2e_script.py RESULT.json --model DIR --prompt-ids '[[1, 2, 3]]' [--tensor-parallel-size 2]
    python tests/vllm_e2e_script.py RESULT.json --snippet docs/snippets/vllm_generate.py  # in the snippet's dir

Writes {"prompts": [[ids]], "outputs": [[ids]], "seconds": s} to RESULT.json (vLLM logs to stdout).
"""

import argparse
import json
import runpy
import time
from pathlib import Path


def generate(model: str, prompt_ids: list[list[int]], max_tokens: int, tensor_parallel_size: int):
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, skip_tokenizer_init=True, max_model_len=64, dtype="bfloat16", enforce_eager=True,
              gpu_memory_utilization=0.3 / tensor_parallel_size, tensor_parallel_size=tensor_parallel_size)
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0, detokenize=False)
    return llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result", type=Path)
    parser.add_argument("--model")
    parser.add_argument("--prompt-ids", type=json.loads)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--snippet", help="a README snippet that leaves vLLM's results in `outputs`")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.snippet:
        outputs = runpy.run_path(args.snippet, run_name="__main__")["outputs"]
    else:
        outputs = generate(args.model, args.prompt_ids, args.max_tokens, args.tensor_parallel_size)
    args.result.write_text(json.dumps({"prompts": [list(o.prompt_token_ids) for o in outputs],
                                       "outputs": [list(o.outputs[0].token_ids) for o in outputs],
                                       "seconds": time.perf_counter() - start}))


if __name__ == "__main__":  # vLLM's engine process imports this file again
    main()
