"""Using a checkpoint: loading it for inference (`load.py`), held-out loss and probe accuracy (`evaluate.py`),
generation with the KV cache (`generate.py`) and export to Hugging Face form (`export.py`). May import `model`,
`tokenizer` and `train.data` (the pipeline's own encoding and decoders); never `train.parallel` or DeepSpeed.
"""
