"""AsyncFlow: asynchronous streaming RL post-training (GRPO, PPO) for language models.

The controller (``asyncflow.controller``) keeps a metadata index of which sample has which
field ready (``asyncflow.transfer``); workers (``asyncflow.workers``) hold the tensors and pull
them from each other directly. Engines (``asyncflow.engines``) sit behind small protocols.
"""

__version__ = "0.1.0"
