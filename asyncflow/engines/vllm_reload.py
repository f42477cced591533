"""Fast in-place weight reload for vLLM's CPU backend: new weights straight into the kernels.

vLLM's CPU backend repacks every linear layer's weight into a oneDNN (or sgl-kernel) handle
after loading and then frees the plain weight. Its generic in-place reload
(``reload_weights``) therefore re-materialises every layer on a meta device, runs the model's
``load_weights`` into it and re-processes layer by layer: about 20-30 ms for the 1M-parameter
tiny model, every step, on the rollout engine's thread -- about a tenth of the rollout core in
the asynchronous pipeline, and on the critical path of the synchronous one.

This module does the same job directly. For a model whose layers are all unquantised it maps
each incoming checkpoint name (``model.layers.0.self_attn.q_proj.weight``) to its vLLM layer
and shard with the model's own ``packed_modules_mapping`` (``qkv_proj <- q, k, v``,
``gate_up_proj <- gate, up``), concatenates the shards of each fused layer, puts the result
back as the layer's weight and re-runs the layer's own ``process_weights_after_loading``,
which repacks it exactly as at start-up. Every other tensor (norms, embeddings, biases) is
copied in place. The tied LM head is repacked from the updated embedding.

Anything it does not recognise -- a quantised layer, tensor parallelism, a renaming weights
mapper, an unknown name, a fused layer that got only some of its shards -- makes it decline;
the caller then falls back to vLLM's generic reload with every tensor of the update. The
engine tests compare log-probs after a sync against a transformers forward with the new
weights, through this path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


class Unsupported(Exception):
    """This update (or this model) is outside the fast path; use the generic reload."""


@dataclass(slots=True)
class _Linear:
    """A repacked linear layer: its module and the checkpoint shards that make its weight."""

    module: Any
    shards: int  # 1, or the number of fused parts (3 for qkv_proj, 2 for gate_up_proj)
    weight: dict[int, torch.Tensor] = field(default_factory=dict)
    bias: dict[int, torch.Tensor] = field(default_factory=dict)


class FastCPUReload:
    """Loads ``(checkpoint name, tensor)`` pairs into a vLLM model on the CPU backend."""

    def __init__(self, model: Any) -> None:
        """Plan the reload for ``model``; raises :class:`Unsupported` when it does not apply."""
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            UnquantizedEmbeddingMethod,
            VocabParallelEmbedding,
        )
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise Unsupported("not the CPU backend")
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        if mapper is not None and any(
            getattr(mapper, attr, None)
            for attr in (
                "orig_to_new_renaming",
                "orig_to_new_regex",
                "orig_to_new_substr",
                "orig_to_new_prefix",
                "orig_to_new_suffix",
            )
        ):
            raise Unsupported("the model renames checkpoint weights")
        self.model = model
        packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}) or {})
        #: checkpoint leaf name -> (fused leaf name, shard index, shard count)
        self.parts = {
            part: (fused, i, len(members))
            for fused, members in packed.items()
            for i, part in enumerate(members)
        }
        self.linears: dict[str, Any] = {}
        self.embeddings: list[Any] = []
        for name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            if isinstance(module, LinearBase):
                if type(method) is not UnquantizedLinearMethod:
                    raise Unsupported(f"{name}: quantised linear layer")
                if getattr(module, "tp_size", 1) != 1:
                    raise Unsupported(f"{name}: tensor parallel")
                self.linears[name] = module
            elif isinstance(module, VocabParallelEmbedding):
                if type(method) is not UnquantizedEmbeddingMethod:
                    raise Unsupported(f"{name}: quantised embedding")
                if getattr(module, "tp_size", 1) != 1:
                    raise Unsupported(f"{name}: tensor parallel")
                self.embeddings.append(module)
        if not self.linears:
            raise Unsupported("no linear layers found")
        self.params = dict(model.named_parameters(remove_duplicate=False))
        config = getattr(model, "config", None)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load an update. Raises :class:`Unsupported` before changing any linear layer's
        kernels if the update does not fit; tensors copied in place until then are rewritten
        by the caller's fallback, which reloads the whole update."""
        staged: dict[str, _Linear] = {}
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, tensor in weights:
            self._stage(name, tensor, staged, copies)
        builds = [(lin, self._assemble(path, lin)) for path, lin in staged.items()]
        with torch.no_grad():
            for param, tensor in copies:
                if param.shape == tensor.shape:
                    param.copy_(tensor)
                else:  # a padded vocabulary: the checkpoint's rows come first
                    param[: tensor.shape[0]].copy_(tensor)
            for lin, (weight, bias) in builds:
                module = lin.module
                if bias is not None:
                    module.bias.copy_(bias)
                module.weight = torch.nn.Parameter(weight, requires_grad=False)
                module.quant_method.process_weights_after_loading(module)
            for module in self.embeddings:  # repack the (tied) LM head from its new weight
                module.quant_method.process_weights_after_loading(module)

    def _stage(
        self,
        name: str,
        tensor: torch.Tensor,
        staged: dict[str, _Linear],
        copies: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        module_path, _, kind = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        fused, shard, shards = self.parts.get(leaf, (leaf, 0, 1))
        target = f"{parent}.{fused}" if parent else fused
        module = self.linears.get(target)
        if module is not None and kind in ("weight", "bias"):
            lin = staged.setdefault(target, _Linear(module, shards))
            if kind == "bias" and getattr(module, "bias", None) is None:
                raise Unsupported(f"{name}: the layer has no bias")
            getattr(lin, kind)[shard] = tensor
            return
        param = self.params.get(name)
        if param is None:
            if self.tied and name == "lm_head.weight":
                return  # tied to the embedding, as vLLM's own loader does
            raise Unsupported(f"{name}: no such parameter")
        fits = param.shape == tensor.shape or (
            param.dim() == tensor.dim()
            and param.shape[1:] == tensor.shape[1:]
            and tensor.shape[0] <= param.shape[0]
            and any(e.weight is param for e in self.embeddings)
        )
        if not fits:
            raise Unsupported(f"{name}: shape {tuple(tensor.shape)} vs {tuple(param.shape)}")
        copies.append((param, tensor))

    def _assemble(self, path: str, lin: _Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        module = lin.module
        if len(lin.weight) != lin.shards or (lin.bias and len(lin.bias) != lin.shards):
            raise Unsupported(f"{path}: an incomplete set of shards")
        weight = torch.cat([lin.weight[i] for i in range(lin.shards)])
        rows = int(sum(module.output_partition_sizes))
        want = (rows, int(getattr(module, "input_size_per_partition", module.input_size)))
        if tuple(weight.shape) != want:
            raise Unsupported(f"{path}: weight {tuple(weight.shape)}, expected {want}")
        dtype = module.params_dtype
        bias = None
        if lin.bias:
            bias = torch.cat([lin.bias[i] for i in range(lin.shards)])
            if bias.shape != module.bias.shape:
                raise Unsupported(f"{path}: bias {tuple(bias.shape)} vs {module.bias.shape}")
        return weight.to(dtype).contiguous(), bias
