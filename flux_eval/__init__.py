"""Evaluation: the benchmark runner (evaluate.py), the test-set readers (datasets.py: MagicBrush,
Emu Edit, the mini world), the metrics (L1, CLIP, DINO) and VIE-Score."""
