from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM starts its engine in a process that imports this file again
    # config.json's quant_method "lowbit" selects lowbit's plugin (an entry point installed with lowbit).
    llm = LLM(model="my-model-int4", dtype="bfloat16", max_model_len=256,
              enforce_eager=True, gpu_memory_utilization=0.3)  # CPU build: 30% of RAM for the KV cache
    outputs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
    print(outputs[0].outputs[0].text)
