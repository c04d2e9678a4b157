"""Evaluation: C-Eval and CMMLU."""
