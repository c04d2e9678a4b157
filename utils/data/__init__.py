"""Data: records read and checked, prompt templates, tokenization and masking, the token store, preference pairs."""
