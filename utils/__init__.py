"""Shared code for the stage scripts: what must be identical across stages lives here once."""
