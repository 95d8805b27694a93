"""Data files shipped with the models package."""
