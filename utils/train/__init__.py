"""Training: the LoRA model set up, callbacks, what a run writes, the end-of-run report, the preference losses and
trainer, and the fast path (train/fast)."""
