"""Sampling, the editing pipeline and CLI, early-filter scaling and judges."""
