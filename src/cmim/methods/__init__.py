"""cmim.methods."""
