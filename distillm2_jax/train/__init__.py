"""Training: state, the jitted step, the Algorithm 1 loop, checkpoints and metrics."""
