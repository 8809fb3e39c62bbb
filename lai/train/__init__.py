"""Training: the loop, the runners, run records."""
