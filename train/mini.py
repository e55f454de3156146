"""`python -m train.mini`: the miniature world's one-command recipe (train/shapes/recipe.py).

    .venv/bin/python -m train.mini --out assets/mini       # the shipped weights; run again to continue
"""

from flux_minimal.errors import run_cli

from train.shapes.recipe import main

if __name__ == "__main__":
    run_cli(main)
