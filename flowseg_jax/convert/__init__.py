"""PyTorch <-> Flax checkpoint converters."""
