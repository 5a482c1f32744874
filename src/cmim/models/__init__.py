"""cmim.models."""
