"""GPU kernels and layer implementations."""
