"""Training geometry of small transformers on marker-based modular addition.

Commands run as `python -m modadd.<name>`: `train` (presets `code` and `paper`, snapshots,
per-m accuracy, attention entropy, SGD commutators), `sweep` (many seeds, then the stages),
the analysis stages `trajectory`, `alignment`, `bubbling`, `sae`, `forgetting`, and `report`
(figures 1-6 and a verdict per finding). Library modules: `task` (the data), `model`
(attention-only and standard pre-LN transformers), `geometry` (trajectory PCA with a
random-walk null, SGD commutators, subspace projections), `ensemble` (seeds trained as one
vmapped network), `runs` (reading run folders), `stats`, `figures`.
"""
