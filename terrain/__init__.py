"""Geometry of pretrained transformers: weights, embeddings, WordNet alignment, modulators.

Stages run as `python -m terrain.<stage>`; shared statistics live in terrain.metrics.
"""
