"""asyncflow.controller."""
