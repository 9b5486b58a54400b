"""Dataset sources, transforms and the grain input pipeline."""
