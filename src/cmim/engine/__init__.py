"""cmim.engine."""
