"""asyncflow.tasks: what the policy is trained on.

``arithmetic`` (the built-in verifiable task), ``datasets`` (``PromptSource`` loaders for the
built-in task, JSON lines and parquet), ``tiny_model`` (the built-in ~1M-parameter checkpoint and
its builder; imports torch) and ``smollm`` (SmolLM2-135M-Instruct converted from a GGUF).
Submodules are imported explicitly; this package imports nothing heavy.
"""
