"""Models: captioners, the scene-graph parser wrapper, RLIPv2 / R-Tagger, baselines, checkpoints (no Prefect)."""
