"""cmim.data."""
