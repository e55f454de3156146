"""Performance tools, each a script with its command in its docstring: the whole edit against
diffusers (edit.py), where the time goes (profile.py), FP8 (fp8.py), weight loading (load.py),
training-data loading (data.py) and the fused LoRA-MoE kernels (lora_moe.py). Nothing imports them."""
