import torch
from transformers import AutoModelForCausalLM

import lowbit  # makes quant_method "lowbit" known to transformers

# Quantize a float checkpoint while loading it (lm_head and the embeddings stay as they are)...
model = AutoModelForCausalLM.from_pretrained("my-model", quantization_config=lowbit.LowbitConfig(scheme="int4-g32"))
model.save_pretrained("my-model-int4")

# ...then load the lowbit checkpoint, bit-exact, in any later session that imported lowbit.
model = AutoModelForCausalLM.from_pretrained("my-model-int4")
print(model.generate(torch.tensor([[1, 17, 42]]), max_new_tokens=8, do_sample=False))
