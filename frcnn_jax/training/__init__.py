"""Training: the optimiser, checkpoints and metric logs."""
