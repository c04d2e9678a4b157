"""Export: the shard-by-shard merge, GGUF models and adapters, templates for other runtimes."""
