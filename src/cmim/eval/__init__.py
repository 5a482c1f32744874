"""cmim.eval."""
