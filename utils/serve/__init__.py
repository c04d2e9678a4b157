"""Serving: token sampling, chat generation, the batched engine, the base-vs-tuned compare, the OpenAI-compatible
routes."""
