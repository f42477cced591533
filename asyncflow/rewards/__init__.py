"""asyncflow.rewards: scoring responses.

``math`` (the built-in answer verifier: ``arithmetic_reward``, ``math_reward``) and
``functions`` (user reward functions by ``"module:function"``, scored in killable worker
processes with a timeout by ``RewardScorer``). Neither imports torch.
"""
