"""Models: the only from_pretrained, the built-in model, LoRA targets and adapters, distributed engines."""
