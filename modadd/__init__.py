"""Training geometry of small transformers on marker-based modular addition.

Stages run as `python -m modadd.<stage>`: `train` (presets `code` and `paper`, snapshots,
per-m accuracy, attention entropy, SGD commutators). Library modules: `task` (the data),
`model` (attention-only and standard pre-LN transformers), `geometry` (trajectory PCA with
a random-walk null, SGD commutators, subspace projections).
"""
