"""asyncflow.engines."""
