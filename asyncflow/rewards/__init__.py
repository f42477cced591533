"""asyncflow.rewards."""
