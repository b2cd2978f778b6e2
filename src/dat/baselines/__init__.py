"""Baselines that ``dat eval`` compares DAT with: GCG, PAIR, strategy prompting and an API
model as the steered agent. Each writes a baseline folder (:mod:`dat.baseline_folder`)."""
