"""asyncflow.transfer."""
