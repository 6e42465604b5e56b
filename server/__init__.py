"""sessionq server process."""
