"""The tag stage's taggers: greedy overlap, R-Tagger, CLIP."""
