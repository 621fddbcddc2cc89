"""The training plumbing both trainers share: data, steps, checkpoints, runs and their records."""
