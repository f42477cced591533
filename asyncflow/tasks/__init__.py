"""asyncflow.tasks."""
