"""The miniature world: a procedural shapes world small enough to train every FLUX component on a
CPU (world.py), its measuring edit checker (check.py), the one-command recipe that makes the
shipped mini model (recipe.py), its long adapter stage (adapters.py) and the experiments that
measure it (ablation, probe, curve, quick). It sits on top of the library, the product and
training; evaluation and benchmarks may read it."""
