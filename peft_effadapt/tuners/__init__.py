"""One folder per PEFT type, in peft's own layout (config.py, layer.py, model.py)."""
