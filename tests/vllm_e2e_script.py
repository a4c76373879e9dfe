"""Greedy generation with vLLM from a lowbit checkpoint, for tests/test_integration_vllm.py.

Runs in a Python that has vLLM and lowbit (whose entry point vLLM loads the plugin from):

    python tests/vllm_e2e_script.py --model DIR --prompt-ids '[[1, 2, 3]]' --max-tokens 8
    python tests/vllm_e2e_script.py --snippet docs/snippets/vllm_generate.py   # in the snippet's directory

Prints one JSON line: {"prompts": [[ids]], "outputs": [[ids]], "seconds": {...}}.
"""

import argparse
import json
import runpy
import time


def generate(model: str, prompt_ids: list[list[int]], max_tokens: int):
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, skip_tokenizer_init=True, max_model_len=64, dtype="bfloat16", enforce_eager=True,
              gpu_memory_utilization=0.3)
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0, detokenize=False)
    return llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--prompt-ids", type=json.loads)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--snippet", help="a README snippet that leaves vLLM's results in `outputs`")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.snippet:
        outputs = runpy.run_path(args.snippet, run_name="__main__")["outputs"]
    else:
        outputs = generate(args.model, args.prompt_ids, args.max_tokens)
    print(json.dumps({"prompts": [list(o.prompt_token_ids) for o in outputs],
                      "outputs": [list(o.outputs[0].token_ids) for o in outputs],
                      "seconds": time.perf_counter() - start}))


if __name__ == "__main__":  # vLLM's engine process imports this file again
    main()
