"""Datasets and the grain input pipeline."""
