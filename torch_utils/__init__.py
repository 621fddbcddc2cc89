"""Command-line plumbing, safe file writes, image grids, the device and its speed switches."""
