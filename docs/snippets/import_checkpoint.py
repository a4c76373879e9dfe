from lowbit.io.importers import convert, load_foreign

# A GPTQ, AWQ or compressed-tensors checkpoint, repacked for lowbit (codes and scales unchanged):
model = load_foreign("my-gptq-model")  # a transformers model whose linears are lowbit.QuantLinear
# (lowbit.load_quantized("my-gptq-model") does the same)
convert("my-gptq-model", "my-model-lowbit")  # or a lowbit checkpoint on disk (`lowbit convert SRC DIR`)
