"""PyTorch training engine: log-probs, optimizer steps, data parallelism and checkpoints.

Owns everything the actor (policy), the reference model and, through :mod:`.critic`, the
critic do with a local transformers causal-LM folder:

- per-token log-probs (and entropy) of given sequences in float32, aligned to input positions
  (column ``t`` is ``log p(x_t | x_<t)``, column 0 is 0), computed chunk by chunk as
  ``gather(logits) - logsumexp(logits)`` so the full-vocabulary log-softmax is never stored;
- an optimizer step streamed one micro-batch at a time (``begin_step``, ``accumulate`` per
  micro-batch as it arrives, ``finish_step``: gradients summed over ranks in one all-reduce,
  grad-norm clipping, AdamW with optional linear warm-up); ``train_step`` runs the same three
  over micro-batches that are all at hand;
- data parallelism over processes with ``torch.distributed`` (gloo on CPU, NCCL on CUDA);
- ``named_weights`` with the exact Hugging Face state-dict names (what vLLM's ``load_weights``
  takes) and safetensors checkpoints: an ordinary HF folder plus ``optimizer.safetensors`` and
  ``trainer_state.json``.

Dropout is always off (modules stay in eval mode) so that log-probs and updates are
deterministic given the seed. The reference role is the same engine with ``trainable=False``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from asyncflow.engines.packing import pack_shared_prompts, packed_token_logprobs
from asyncflow.engines.protocols import LossContext, LossFn, TrainBatch

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_NOT_COPIED = {"config.json", "model.safetensors.index.json", STATE_FILE}
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


@dataclass(frozen=True, slots=True)
class OptimizerConfig:
    """AdamW and its schedule."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices only (not to biases and norm weights)
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr, then constant
    max_grad_norm: float = 1.0  # <= 0 disables clipping (the norm is still reported)


@dataclass(frozen=True, slots=True)
class DistributedConfig:
    """Explicit data-parallel rendezvous; ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str | None = None  # None: nccl on CUDA, gloo on CPU
    local_rank: int | None = None  # CUDA device index; default rank % device_count


@dataclass(frozen=True, slots=True)
class TrainerConfig:
    """Settings shared by the actor, reference and critic engines."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    seed: int = 0
    temperature: float = 1.0  # log-probs of logits / temperature, to match the sampler
    logprob_chunk: int = 256  # positions per log-softmax chunk
    forward_batch_size: int | None = None  # rows per forward in logprobs(); None: all
    attn_implementation: str = "sdpa"
    #: one forward per group of rows sharing a prompt (GRPO): see :mod:`.packing`
    shared_prefix: bool = True
    #: "bf16": the model's forward (and so its backward) under bfloat16 autocast; weights,
    #: gradients, optimizer state, log-softmax and loss stay float32. "fp32": float32 throughout.
    mixed_precision: str = "fp32"
    device: str | None = None  # None: cuda:<local_rank> when available, else cpu


def resolve_device(config: TrainerConfig, dist_cfg: DistributedConfig) -> torch.device:
    """The device this process trains on."""
    if config.device is not None:
        return torch.device(config.device)
    if torch.cuda.is_available():
        local = dist_cfg.local_rank
        if local is None:
            local = dist_cfg.rank % torch.cuda.device_count()
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed(dist_cfg: DistributedConfig, device: torch.device) -> None:
    """Join the data-parallel process group (once per process) when ``world_size > 1``."""
    if dist_cfg.world_size <= 1 or dist.is_initialized():
        return
    backend = dist_cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{dist_cfg.master_addr}:{dist_cfg.master_port}",
        rank=dist_cfg.rank,
        world_size=dist_cfg.world_size,
    )


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = 256,
    with_entropy: bool = False,
    entropy_grad: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-token float32 log-probs of ``input_ids`` (B, T) under ``logits`` (B, T, V).

    The logits at position ``t - 1`` predict token ``t``; the result is aligned to input
    positions, with column 0 set to 0. Each chunk of positions is upcast to float32 on its own
    and reduced as ``gather - logsumexp``. With ``with_entropy`` also returns the entropy of the
    predictive distribution of each position's token (same alignment, column 0 is 0); with
    ``entropy_grad=False`` the entropy is computed without a graph (for metrics: saves storing
    the (B, T, V) probabilities for the backward pass).
    """
    batch, length, _ = logits.shape
    zeros = torch.zeros(batch, 1, dtype=torch.float32, device=logits.device)  # (B, 1)
    lp_parts, ent_parts = [zeros], [zeros]
    for start in range(0, length - 1, max(chunk, 1)):
        end = min(start + chunk, length - 1)
        scaled = logits[:, start:end].float() / temperature  # (B, C, V)
        targets = input_ids[:, start + 1 : end + 1]  # (B, C)
        lse = torch.logsumexp(scaled, dim=-1)  # (B, C)
        picked = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, C)
        lp_parts.append(picked - lse)
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                probs = torch.softmax(scaled, dim=-1)  # (B, C, V)
                ent_parts.append(lse - (probs * scaled).sum(dim=-1))  # (B, C)
    out = {"logprobs": torch.cat(lp_parts, dim=1)}  # (B, T)
    if with_entropy:
        out["entropy"] = torch.cat(ent_parts, dim=1)  # (B, T)
    return out


def copy_tokenizer_files(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Copy tokenizer and generation files from one model folder to another (not weights)."""
    src, dst = Path(source), Path(target)
    if src.resolve() == dst.resolve():
        return
    for item in src.iterdir():
        if (
            not item.is_file()
            or item.name in _NOT_COPIED
            or not item.name.endswith(_COPIED_SUFFIXES)
        ):
            continue
        if not (dst / item.name).exists():
            shutil.copy2(item, dst / item.name)


def load_model_weights(module: nn.Module, folder: str | os.PathLike[str], prefix: str = "") -> None:
    """Load ``model*.safetensors`` from an HF folder into ``module`` (keys under ``prefix``).

    Keys absent from the files are accepted only when they share storage with a loaded key
    (tied embeddings, which ``save_pretrained`` writes once).
    """
    files = sorted(Path(folder).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {folder}")
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        loaded.update({prefix + k: v for k, v in load_file(str(file)).items()})
    own = module.state_dict()
    unexpected = set(loaded) - set(own)
    if unexpected:
        raise ValueError(f"unexpected weights in {folder}: {sorted(unexpected)[:5]}")
    missing = [k for k in own if k not in loaded and k.startswith(prefix)]
    ptrs = {own[k].data_ptr() for k in loaded}
    untied = [k for k in missing if own[k].data_ptr() not in ptrs]
    if untied:
        raise ValueError(f"weights missing from {folder}: {untied[:5]}")
    module.load_state_dict(loaded, strict=False)


class TorchEngineBase:
    """What the actor and the critic share: devices, data parallelism, AdamW, the optimizer
    step, checkpoints. Data-parallel ranks sum their gradients in :meth:`finish_step` (one
    all-reduce per step, so micro-batches stream in with no communication).

    Subclasses build ``self.module`` (the raw, unwrapped ``nn.Module``) in ``_build`` and say
    in ``_outputs`` what one forward returns for a micro-batch.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        config: TrainerConfig | None = None,
        distributed: DistributedConfig | None = None,
        trainable: bool = True,
    ) -> None:
        self.config = config or TrainerConfig()
        if self.config.mixed_precision not in ("fp32", "bf16"):
            raise ValueError(
                f"mixed_precision must be 'fp32' or 'bf16', not {self.config.mixed_precision!r}"
            )
        self.dist_cfg = distributed or DistributedConfig()
        self.trainable = trainable
        self.source_path = str(model_path)
        self.device = resolve_device(self.config, self.dist_cfg)
        init_distributed(self.dist_cfg, self.device)
        torch.manual_seed(self.config.seed)
        self.module: nn.Module = self._build(self.source_path).to(self.device)
        self.module.eval()  # no dropout: deterministic log-probs and updates
        self._step = 0
        self._last_lr = self.current_lr()
        self.module.requires_grad_(trainable)
        self._freeze_unused()
        self.optimizer: torch.optim.AdamW | None = None
        if trainable:
            self.optimizer = self._make_optimizer()

    # --- subclass hooks -------------------------------------------------------------------
    def _build(self, model_path: str) -> nn.Module:
        raise NotImplementedError

    def _outputs(
        self, module: nn.Module, batch: TrainBatch, with_entropy: bool, entropy_grad: bool = False
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _freeze_unused(self) -> None:
        """Turn off gradients of parameters the forward never uses (they would never get one)."""

    def _save_model(self, path: Path) -> None:
        raise NotImplementedError

    def _load_model(self, path: Path) -> None:
        raise NotImplementedError

    # --- properties -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.dist_cfg.rank if self.dist_cfg.world_size > 1 else 0

    @property
    def world_size(self) -> int:
        return max(self.dist_cfg.world_size, 1)

    @property
    def step(self) -> int:
        """Training steps taken so far, skipped ones included: the policy version (restored by
        :meth:`load`)."""
        return self._step

    # --- optimizer --------------------------------------------------------------------------
    def _named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def _make_optimizer(self) -> torch.optim.AdamW:
        opt = self.config.optimizer
        named = self._named_trainable()
        decay = [p for _, p in named if p.dim() >= 2]
        no_decay = [p for _, p in named if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": opt.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # The fused kernel (CPU and CUDA) is 6x faster than the per-tensor loop on CPU for a
        # 135M-parameter model (0.06 s vs 0.40 s per step on one core).
        return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=True)

    def _param_order(self) -> list[str]:
        """Parameter names in the optimizer's index order (decay group first)."""
        named = self._named_trainable()
        return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]

    def current_lr(self) -> float:
        """The learning rate the next optimizer step uses (after warm-up scaling)."""
        opt = self.config.optimizer
        if opt.warmup_steps > 0:
            return opt.lr * min(1.0, (self._step + 1) / opt.warmup_steps)
        return opt.lr

    # --- forward ----------------------------------------------------------------------------
    def _to_device(self, batch: TrainBatch) -> TrainBatch:
        return TrainBatch(
            input_ids=batch.input_ids.to(self.device),
            attention_mask=batch.attention_mask.to(self.device),
            loss_mask=batch.loss_mask.to(self.device).float(),
            tensors={k: v.to(self.device) for k, v in batch.tensors.items()},
        )

    @torch.no_grad()
    def _forward_no_grad(self, batch: TrainBatch, with_entropy: bool) -> dict[str, torch.Tensor]:
        """Forward in row chunks of ``forward_batch_size``; results on the CPU."""
        rows = batch.input_ids.shape[0]
        size = self.config.forward_batch_size or max(rows, 1)
        parts: list[dict[str, torch.Tensor]] = []
        for start in range(0, rows, size):
            piece = TrainBatch(
                input_ids=batch.input_ids[start : start + size],
                attention_mask=batch.attention_mask[start : start + size],
                loss_mask=batch.loss_mask[start : start + size],
            )
            out = self._outputs(self.module, self._to_device(piece), with_entropy)
            parts.append({k: v.float().cpu() for k, v in out.items()})
        return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- training ---------------------------------------------------------------------------
    def _all_reduce(self, values: list[float], op: Any = None) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor.tolist()

    def _loss_context(self, micro_batches: Sequence[TrainBatch]) -> LossContext:
        tokens = sum(float(mb.loss_mask.float().sum().item()) for mb in micro_batches)
        seqs = sum(int((mb.loss_mask.float().sum(dim=1) > 0).sum().item()) for mb in micro_batches)
        n = float(len(micro_batches))
        most, neg_least = self._all_reduce(
            [n, -n], dist.ReduceOp.MAX if self.world_size > 1 else None
        )
        if most != -neg_least:
            raise ValueError("every rank must pass the same number of micro-batches")
        g_tokens, g_seqs = self._all_reduce([tokens, float(seqs)])
        return LossContext(g_tokens, int(g_seqs), self.world_size, self._step)

    def train_step(self, micro_batches: Sequence[TrainBatch], loss_fn: object) -> dict[str, float]:
        """One optimizer step over micro-batches that are all at hand: the streaming path
        (:meth:`begin_step`, :meth:`accumulate` per micro-batch, :meth:`finish_step`) with the
        loss context counted from them (global tokens and sequences over every rank, so the
        update equals one on the concatenated global batch). Every rank must pass the same
        number of micro-batches. Returns what :meth:`finish_step` does, plus ``sequences``.
        """
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        if not isinstance(loss_fn, LossFn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, batch, ctx)")
        ctx = self._loss_context(micro_batches)
        self.begin_step(ctx)
        for mb in micro_batches:
            self.accumulate(mb, loss_fn)
        return {**self.finish_step(), "sequences": float(ctx.global_sequences)}

    # --- streaming: micro-batches arrive one by one -----------------------------------------
    def begin_step(self, ctx: LossContext) -> None:
        """Start an optimizer step whose micro-batches will arrive one at a time (streaming).

        ``ctx`` must be known up front: streaming callers use a fixed normaliser (e.g. rows per
        step x max new tokens) since the step's token count is unknown until its last row."""
        if self.optimizer is None:
            raise RuntimeError("this engine was built with trainable=False")
        self.optimizer.zero_grad(set_to_none=True)
        self._stream: tuple[LossContext, list[float], list[tuple[float, dict[str, float]]]] = (
            ctx,
            [],
            [],
        )

    def accumulate(self, micro_batch: TrainBatch, loss_fn: object) -> dict[str, float]:
        """Forward/backward one micro-batch of the step begun by :meth:`begin_step`. Gradients
        stay local (no communication) until :meth:`finish_step` sums them over ranks."""
        stream = getattr(self, "_stream", None)
        if stream is None:
            raise RuntimeError("accumulate() before begin_step()")
        if not isinstance(loss_fn, LossFn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, batch, ctx)")
        ctx, losses, records = stream
        needs_entropy = bool(getattr(loss_fn, "needs_entropy", False))
        entropy_grad = bool(getattr(loss_fn, "entropy_grad", needs_entropy))
        mb = self._to_device(micro_batch)
        outputs = self._outputs(self.module, mb, needs_entropy, entropy_grad)
        loss, metrics = loss_fn(outputs, mb, ctx)
        loss.backward()  # each micro-batch loss is its share of the global loss: grads sum
        losses.append(float(loss.detach().item()))
        records.append((float(mb.loss_mask.sum().item()), metrics))
        return {"loss": losses[-1], **metrics}

    def finish_step(self) -> dict[str, float]:
        """Sum gradients over ranks (every rank must call this), clip, step, report."""
        stream = getattr(self, "_stream", None)
        if stream is None:
            raise RuntimeError("finish_step() before begin_step()")
        _, losses, records = stream
        del self._stream
        for _, p in self._named_trainable():
            if p.grad is None:  # no micro-batch touched it: its gradient is zero, not absent
                p.grad = torch.zeros_like(p)  # (AdamW skips absent ones: moments would stall)
        if self.world_size > 1:
            self._sum_gradients()
        grad_norm, skipped = self._optimizer_step()
        result = self._reduce_metrics(records) if self.world_size > 1 or records else {}
        result.update(
            loss=self._all_reduce([sum(losses)])[0],
            grad_norm=grad_norm,
            lr=self._last_lr,
            tokens=self._all_reduce([sum(w for w, _ in records)])[0],
            step=float(self._step),
            skipped=float(skipped),
            micro_batches=float(len(records)),
        )
        return result

    def _sum_gradients(self) -> None:
        params = [p for _, p in self._named_trainable()]
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))  # type: ignore[union-attr]
            offset += n

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip, step (unless the gradient is not finite) and advance the schedule.

        A skipped step still counts: :attr:`step` is the policy version, and the controller
        admits rollouts, measures staleness and names checkpoints by it, so it must advance once
        per training step (the weights of the new version equal the old ones)."""
        assert self.optimizer is not None
        params = [p for _, p in self._named_trainable()]
        max_norm = self.config.optimizer.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        grad_norm = float(norm.item())
        self._last_lr = self.current_lr()
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            self._step += 1
            return grad_norm, True
        for group in self.optimizer.param_groups:
            group["lr"] = self._last_lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._step += 1
        return grad_norm, False

    def _reduce_metrics(self, records: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
        """Token-weighted mean of each metric; ``*_max`` / ``*_min`` keys by max / min."""
        keys = sorted({k for _, m in records for k in m})
        means = [k for k in keys if not k.endswith(("_max", "_min"))]
        sums = [sum(w * m.get(k, 0.0) for w, m in records) for k in means]
        weight = sum(w for w, _ in records)
        reduced = self._all_reduce([*sums, weight])
        out = {k: s / max(reduced[-1], 1e-12) for k, s in zip(means, reduced[:-1])}
        maxes = [k for k in keys if k.endswith("_max")]
        mins = [k for k in keys if k.endswith("_min")]
        local_max = [max(m.get(k, float("-inf")) for _, m in records) for k in maxes]
        local_min = [-min(m.get(k, float("inf")) for _, m in records) for k in mins]
        op = dist.ReduceOp.MAX if self.world_size > 1 else None
        both = self._all_reduce([*local_max, *local_min], op) if keys else []
        out.update(zip(maxes, both[: len(maxes)]))
        out.update((k, -v) for k, v in zip(mins, both[len(maxes) :]))
        return out

    # --- weights and checkpoints ------------------------------------------------------------
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs with the Hugging Face state-dict names (the raw module's)."""
        for name, tensor in self.module.state_dict().items():
            yield name.removeprefix("module."), tensor.detach()

    def save(self, path: str) -> None:
        """Write an HF model folder (+ optimizer state) at ``path``; rank 0 writes, all wait."""
        target = Path(path)
        if self.rank == 0:
            target.mkdir(parents=True, exist_ok=True)
            self._save_model(target)
            copy_tokenizer_files(self.source_path, target)
            self._save_trainer_state(target)
        if self.world_size > 1:
            dist.barrier()

    def load(self, path: str) -> None:
        """Restore weights and, when present, optimizer state and step from :meth:`save`."""
        source = Path(path)
        self._load_model(source)
        state_file = source / STATE_FILE
        if state_file.exists():
            state = json.loads(state_file.read_text())
            self._step = int(state["step"])
            if self.optimizer is not None and (source / OPTIMIZER_FILE).exists():
                self._load_optimizer(source, state)
        # source_path stays the original model folder: tokenizer files are copied from there
        # (a checkpoint folder may be pruned while training goes on)

    def _save_trainer_state(self, target: Path) -> None:
        state: dict[str, Any] = {"step": self._step, "optimizer": asdict(self.config.optimizer)}
        if self.optimizer is not None:
            names = self._param_order()
            sd = self.optimizer.state_dict()
            flat = {
                f"{names[idx]}::{key}": value.detach().cpu().contiguous()
                for idx, slots in sd["state"].items()
                for key, value in slots.items()
                if isinstance(value, torch.Tensor)
            }
            if flat:
                save_file(flat, str(target / OPTIMIZER_FILE))
            state["param_groups"] = [
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": [names[i] for i in g["params"]],
                }
                for g in sd["param_groups"]
            ]
        (target / STATE_FILE).write_text(json.dumps(state, indent=2))

    def _load_optimizer(self, source: Path, state: dict[str, Any]) -> None:
        assert self.optimizer is not None
        names = self._param_order()
        index = {n: i for i, n in enumerate(names)}
        flat = load_file(str(source / OPTIMIZER_FILE))  # CPU; load_state_dict moves slots
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            name, slot = key.rsplit("::", 1)
            slots.setdefault(index[name], {})[slot] = value
        groups = []
        for g in state["param_groups"]:
            group = dict(g)
            group["params"] = [index[n] for n in g["params"]]
            group["betas"] = tuple(group["betas"])
            groups.append(group)
        self.optimizer.load_state_dict({"state": slots, "param_groups": groups})


class TorchTrainingEngine(TorchEngineBase):
    """The policy (actor) engine, or the reference model with ``trainable=False``.

    Implements :class:`~asyncflow.engines.protocols.TrainingEngine` over any local
    transformers causal-LM folder.
    """

    def _build(self, model_path: str) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=torch.float32,
            attn_implementation=self.config.attn_implementation,
        )

    def _outputs(
        self, module: nn.Module, batch: TrainBatch, with_entropy: bool, entropy_grad: bool = False
    ) -> dict[str, torch.Tensor]:
        packed = pack_shared_prompts(batch) if self.config.shared_prefix else None
        if packed is not None:
            dev, dtype = self.device, next(self.module.parameters()).dtype
            with self._autocast():
                logits = module(
                    input_ids=packed.input_ids.to(dev),
                    attention_mask=packed.attention_mask.to(dev, dtype),  # additive
                    position_ids=packed.position_ids.to(dev),
                    use_cache=False,
                ).logits  # (G, S, V)
            return packed_token_logprobs(
                logits,
                packed.to(dev),
                self.config.temperature,
                self.config.logprob_chunk,
                with_entropy,
                entropy_grad,
            )
        with self._autocast():
            logits = module(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).logits  # (B, T, V)
        out = token_logprobs(
            logits,
            batch.input_ids,
            self.config.temperature,
            self.config.logprob_chunk,
            with_entropy,
            entropy_grad,
        )
        keep = batch.attention_mask.bool()  # (B, T): zero the padding positions
        return {k: torch.where(keep, v, torch.zeros_like(v)) for k, v in out.items()}

    def logprobs(self, batch: TrainBatch, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        """Per-token float32 ``logprobs`` (B, T) on the CPU, column 0 and padding 0; with
        ``with_entropy`` also ``entropy`` (B, T)."""
        return self._forward_no_grad(batch, with_entropy)

    def _save_model(self, path: Path) -> None:
        self.module.save_pretrained(str(path), safe_serialization=True)  # type: ignore[operator]

    def _load_model(self, path: Path) -> None:
        load_model_weights(self.module, path)


__all__ = [
    "DistributedConfig",
    "OptimizerConfig",
    "TorchEngineBase",
    "TorchTrainingEngine",
    "TrainerConfig",
    "copy_tokenizer_files",
    "init_distributed",
    "load_model_weights",
    "resolve_device",
    "token_logprobs",
]
