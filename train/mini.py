"""`python -m train.mini`: the miniature world's one-command recipe (train/shapes/recipe.py).

    .venv/bin/python -m train.mini --out assets/mini       # the shipped weights; run again to continue
"""

from train.shapes.recipe import main

if __name__ == "__main__":
    raise SystemExit(main())
