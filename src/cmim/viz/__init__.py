"""cmim.viz."""
