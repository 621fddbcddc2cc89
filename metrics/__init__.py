"""The generator's measures and their table."""
