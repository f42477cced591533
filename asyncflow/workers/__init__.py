"""asyncflow.workers."""
