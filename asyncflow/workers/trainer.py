"""The ``actor``, ``reference`` and ``critic`` roles: PyTorch training engines behind HTTP.

=================  ============================================  =================================
op                 consumes                                      produces / does
=================  ============================================  =================================
actor
``train_micro``    ``prompt_ids``, ``response_ids``,              forward/backward, gradients
                   ``rollout_logprobs``, ``advantages``           accumulate (streaming); rows with
                   (+ ``ref_logprobs`` with a KL penalty)         all-zero advantages are skipped
                                                                 when that is exact (no KL/entropy)
``finish``         --                                            one optimizer step on every rank;
                                                                 the policy version is the step
``sync_init``      rendezvous of the weight-sync group           rank 0 hosts it
``sync_send``      --                                            broadcast weights, in buckets
``save``/``load``  a checkpoint folder                           safetensors model + optimizer
reference
``ref_logprobs``   ``prompt_ids``, ``response_ids``              ``ref_logprobs`` (ragged)
critic
``values``         ``prompt_ids``, ``response_ids``              ``values`` (ragged, per token)
``gae``            ``response_ids``, ``reward``, ``values``      ``advantages``, ``returns``
``train_micro``    + ``returns``, ``values``                     value-loss gradients accumulate
``finish``         --                                            one optimizer step
=================  ============================================  =================================

Heavy compute runs in a worker thread so the HTTP server keeps answering health checks.
Data-parallel ranks are separate worker processes joined by torch.distributed (gloo on CPU,
NCCL on GPU); the controller deals micro-batches to them and calls ``finish`` on all at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch

from asyncflow.algorithms.advantages import gae_advantages, masked_whiten
from asyncflow.algorithms.losses import PolicyLossConfig
from asyncflow.algorithms.objectives import ADVANTAGES, PolicyObjective, ValueObjective
from asyncflow.engines.protocols import LossContext, PolicyEngine, TrainingEngine, ValueEngine
from asyncflow.roles.ops import (
    ActorSyncInitParams,
    CheckpointResult,
    FinishResult,
    NoParams,
    OkResult,
    PathParams,
    Produced,
    StepParams,
    SyncSendMetrics,
    SyncSendResult,
    TrainMicroParams,
    TrainMicroResult,
    WorkResult,
    wire,
)
from asyncflow.roles.settings import (
    ActorSettings,
    CriticSettings,
    OptimizedSettings,
    ReferenceSettings,
    TrainerSettings,
    parse_settings,
)
from asyncflow.tasks.sources import resolve_model
from asyncflow.transfer.client import Column
from asyncflow.transfer.service import BadRequest
from asyncflow.workers.batches import (
    build_train_batch,
    response_values,
    rows_with_signal,
    select_rows,
)
from asyncflow.workers.server import Op, WorkRequest, need_batch


def _engine_config(settings: TrainerSettings) -> Any:
    """The training engine's config: a reference (never trained) takes the engine's own
    defaults for what only training uses."""
    from asyncflow.engines.torch_trainer import OptimizerConfig, TrainerConfig

    if not isinstance(settings, OptimizedSettings):
        return TrainerConfig(
            seed=settings.seed, temperature=settings.temperature, device=settings.device
        )
    return TrainerConfig(
        optimizer=OptimizerConfig(
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            warmup_steps=settings.warmup_steps,
            max_grad_norm=settings.max_grad_norm,
        ),
        seed=settings.seed,
        temperature=settings.temperature,
        device=settings.device,
        mixed_precision=settings.mixed_precision,
        shared_prefix=settings.shared_prefix,
    )


def _dist_config(settings: TrainerSettings) -> Any:
    from asyncflow.engines.torch_trainer import DistributedConfig

    d = settings.distributed
    if d is None:
        return DistributedConfig()
    return DistributedConfig(
        rank=d.rank, world_size=d.world_size, master_addr=d.master_addr, master_port=d.master_port
    )


class TrainerRole:
    """Shared by the three roles: an engine, batch building, per-step accumulation."""

    def __init__(self, role: str, settings: TrainerSettings | Mapping[str, Any]) -> None:
        """``settings``: typed, or a (partial) mapping over the default config's."""
        self.name = role
        self.settings: TrainerSettings = cast(TrainerSettings, parse_settings(role, settings))
        self.model_dir = str(resolve_model(self.settings.model))
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self._engine: TrainingEngine | None = None
        self.sender: Any = None
        self.pad_id = 0
        self._lock = asyncio.Lock()  # one compute at a time; ops queue up in order
        #: held while a weight sync reads the weights: the optimizer step (and a checkpoint
        #: load) wait for it, forward/backward of the next step's micro-batches need not
        self._weights_lock = asyncio.Lock()
        self._stream_step: tuple[int, int] | None = None  # (step, attempt) being accumulated
        #: the newest (step, attempt) begun: a request of an older one is a leftover of an
        #: attempt the controller gave up on (its HTTP call was cancelled, not the handler)
        self._newest: tuple[int, int] | None = None
        self._rows = [0, 0]  # rows of the step being accumulated: trained, skipped
        self.busy_s = 0.0

    async def start(self) -> None:
        from transformers import AutoConfig

        cfg = await asyncio.to_thread(AutoConfig.from_pretrained, self.model_dir)
        self.pad_id = int(getattr(cfg, "pad_token_id", None) or 0)
        self.engine = await asyncio.to_thread(self._build)

    def _build(self) -> TrainingEngine:
        from asyncflow.engines.critic import TorchCriticEngine
        from asyncflow.engines.torch_trainer import TorchTrainingEngine

        cls = TorchCriticEngine if self.name == "critic" else TorchTrainingEngine
        return cls(
            self.model_dir,
            _engine_config(self.settings),
            _dist_config(self.settings),
            trainable=self.name != "reference",
        )

    @property
    def engine(self) -> TrainingEngine:
        """The training engine (built by :meth:`start`)."""
        if self._engine is None:
            raise RuntimeError(f"the {self.name} role's engine is not started")
        return self._engine

    @engine.setter
    def engine(self, engine: TrainingEngine) -> None:
        self._engine = engine

    def info(self) -> dict[str, Any]:
        step = self._engine.step if self._engine is not None else 0
        # the device it trains on: what the weight sync's backend "auto" goes by
        device = str(getattr(self._engine, "device", "cpu"))
        return {"policy_version": step, "compute_s": self.busy_s, "device": device}

    async def close(self) -> None:
        if self.sender is not None:
            self.sender.close()

    async def _run(self, fn: Any, *args: Any) -> Any:
        async with self._lock:
            t0 = time.monotonic()
            try:
                return await asyncio.to_thread(fn, *args)
            finally:
                self.busy_s += time.monotonic() - t0

    async def _batch(self, req: WorkRequest, op: str, extra: tuple[str, ...] = ()) -> Any:
        names = ["prompt_ids", "response_ids", *extra]
        cols = await req.client.fetch(need_batch(req.batch, op, names), names)
        # a row of a per-token column is 1-D (stacked: (B, L)); a per-row scalar stacks to (B,)
        per_token = {n: cols[n] for n in extra if cols[n].ragged or cols[n].data.values.dim() > 1}
        per_row = {n: cols[n] for n in extra if n not in per_token}
        return build_train_batch(
            cols["prompt_ids"], cols["response_ids"], per_token, per_row, self.pad_id
        )

    def _refuse_stale(self, key: tuple[int, int]) -> None:
        if self._newest is not None and key < self._newest:
            raise BadRequest(
                f"step {key[0]} attempt {key[1]} is older than step {self._newest[0]} attempt "
                f"{self._newest[1]}, already begun: a leftover of an abandoned attempt",
                409,
            )

    def _begin(self, key: tuple[int, int], tokens: float, sequences: int) -> None:
        """Fresh gradients for ``key`` (a new step, or a retried attempt of one)."""
        self.engine.begin_step(self._ctx(tokens, sequences))
        self._stream_step = self._newest = key
        self._rows = [0, 0]

    def _ctx(self, global_tokens: float, global_sequences: int) -> LossContext:
        return LossContext(
            global_tokens, global_sequences, self.engine.world_size, self.engine.step
        )

    async def train_micro(self, req: WorkRequest[TrainMicroParams]) -> dict[str, Any]:
        p = req.params
        key, tokens, sequences = p.key, p.global_tokens, p.global_sequences
        cols = tuple(p.columns)
        self._refuse_stale(key)
        batch, skipped = self._prune(await self._batch(req, "train_micro", cols))
        loss_fn = self._loss_fn()

        def work() -> dict[str, float]:
            # checked again here: a retry may have begun while this request pulled its rows,
            # and its gradients must not be wiped by (or mixed with) this leftover
            self._refuse_stale(key)
            if self._stream_step != key:  # a new step, or a retried one: fresh gradients
                self._begin(key, tokens, sequences)
            trained = int(batch.input_ids.shape[0])
            self._rows[0] += trained
            self._rows[1] += skipped
            if trained == 0:  # nothing here moves the weights
                return {"skipped_rows": float(skipped)}
            out: dict[str, float] = self.engine.accumulate(batch, loss_fn)
            return {**out, "skipped_rows": float(skipped)}

        return wire(TrainMicroResult.model_construct(metrics=await self._run(work)))

    async def finish(self, req: WorkRequest[StepParams]) -> dict[str, Any]:
        p = req.params
        key = p.key
        self._refuse_stale(key)
        if self._stream_step != key:  # this rank got no micro-batch: join with zero grads
            self._begin(key, p.global_tokens, p.global_sequences)
        self._stream_step = None
        async with self._weights_lock:
            metrics = await self._run(self.engine.finish_step)
        trained, skipped = self._rows
        if trained + skipped:
            metrics["trained_rows_frac"] = trained / (trained + skipped)
        return wire(FinishResult.model_construct(metrics=metrics, version=self.engine.step))

    def _prune(self, batch: Any) -> tuple[Any, int]:
        """The rows of a micro-batch worth a forward/backward, and how many were dropped."""
        return batch, 0

    def _loss_fn(self) -> Any:
        raise NotImplementedError

    def ops(self) -> Mapping[str, Op]:
        raise NotImplementedError

    async def save(self, req: WorkRequest[PathParams]) -> dict[str, Any]:
        path = req.params.path
        await self._run(self.engine.save, path)
        return wire(CheckpointResult.model_construct(ok=True, version=self.engine.step))

    async def load(self, req: WorkRequest[PathParams]) -> dict[str, Any]:
        path = req.params.path
        if not Path(path).is_dir():  # noqa: ASYNC240 - one stat, before a long load
            raise BadRequest(f"params.path: no checkpoint folder at {path!r}", 404)
        async with self._weights_lock:
            await self._run(self.engine.load, path)
        # training goes on from the checkpoint's step (a resumed controller may count from
        # an earlier step than this process last saw)
        self._stream_step = self._newest = None
        return wire(CheckpointResult.model_construct(ok=True, version=self.engine.step))


class ActorRole(TrainerRole):
    def __init__(self, settings: ActorSettings | Mapping[str, Any]) -> None:
        super().__init__("actor", settings)
        s = cast(ActorSettings, self.settings)
        loss = s.loss.model_dump(exclude={"old_policy"})
        self.objective = PolicyObjective(PolicyLossConfig(**loss), old_policy=s.loss.old_policy)
        cfg = self.objective.config
        #: exact only when a zero-advantage token adds nothing to the loss: no KL, no entropy
        self.skip_zero_advantage = (
            s.skip_zero_advantage and cfg.kl_coef == 0.0 and cfg.entropy_coef == 0.0
        )

    def ops(self) -> Mapping[str, Op]:
        return {
            "train_micro": self.train_micro,
            "finish": self.finish,
            "save": self.save,
            "load": self.load,
            "sync_init": self.sync_init,
            "sync_send": self.sync_send,
        }

    def _loss_fn(self) -> Any:
        return self.objective

    def _prune(self, batch: Any) -> tuple[Any, int]:
        if not self.skip_zero_advantage or ADVANTAGES not in batch.tensors:
            return batch, 0
        keep = rows_with_signal(batch, ADVANTAGES)
        if bool(keep.all()):
            return batch, 0
        if not bool(keep.any()) and self.engine.world_size > 1:
            # data-parallel ranks reduce their metrics together: keep one (zero) row so that
            # this rank reports the same metric names as the others
            keep[0] = True
        return select_rows(batch, keep), int((~keep).sum())

    async def sync_init(self, req: WorkRequest[ActorSyncInitParams]) -> dict[str, Any]:
        from asyncflow.engines.weight_sync import WeightSender

        p = req.params
        if self.sender is not None:  # the group is being formed anew (a worker was replaced)
            self.sender.close()
        self.sender = WeightSender(
            p.host,
            p.port,
            p.world_size,
            backend=p.backend,
            bucket_bytes=p.bucket_mb << 20,
            timeout_s=p.timeout_s,
        )
        await self.sender.aconnect()
        return wire(OkResult.model_construct(ok=True))

    async def sync_send(self, req: WorkRequest[NoParams]) -> dict[str, Any]:
        if self.sender is None:
            raise BadRequest("sync_send before sync_init")
        # Not under the compute lock: the send mostly waits for the rollout engines to reach a
        # step boundary, and the next step's forward/backward (which only reads the weights)
        # runs meanwhile; the optimizer step waits for the weights lock.
        async with self._weights_lock:
            version = self.engine.step
            weights = list(self.engine.named_weights())
            stats = await asyncio.to_thread(self.sender.send, weights, version)
        metrics = SyncSendMetrics.model_construct(seconds=stats.seconds, bytes=stats.bytes)
        return wire(SyncSendResult.model_construct(version=version, metrics=metrics))


class ReferenceRole(TrainerRole):
    def __init__(self, settings: ReferenceSettings | Mapping[str, Any]) -> None:
        super().__init__("reference", settings)

    def ops(self) -> Mapping[str, Op]:
        return {"ref_logprobs": self.ref_logprobs}

    async def ref_logprobs(self, req: WorkRequest[NoParams]) -> dict[str, Any]:
        batch = await self._batch(req, "ref_logprobs")
        assert req.batch is not None  # checked by _batch
        out = await self._run(cast(PolicyEngine, self.engine).logprobs, batch)
        rows = response_values(batch, out["logprobs"])
        shapes = req.unit.put("ref_logprobs", req.batch.rows, rows)
        produced = {"ref_logprobs": Produced.of(shapes, "float32")}
        return wire(WorkResult.model_construct(produced=produced))


class CriticRole(TrainerRole):
    def __init__(self, settings: CriticSettings | Mapping[str, Any]) -> None:
        super().__init__("critic", settings)
        s = cast(CriticSettings, self.settings)
        self.objective = ValueObjective(clip_range=s.value_clip)
        self.gamma, self.lam, self.whiten = s.gamma, s.lam, s.whiten_advantages

    def ops(self) -> Mapping[str, Op]:
        return {
            "values": self.values,
            "gae": self.gae,
            "train_micro": self.train_micro,
            "finish": self.finish,
            "save": self.save,
            "load": self.load,
        }

    def _loss_fn(self) -> Any:
        return self.objective

    async def values(self, req: WorkRequest[NoParams]) -> dict[str, Any]:
        batch = await self._batch(req, "values")
        assert req.batch is not None  # checked by _batch
        vals = await self._run(cast(ValueEngine, self.engine).values, batch)
        rows = response_values(batch, vals)
        shapes = req.unit.put("values", req.batch.rows, rows)
        return wire(WorkResult.model_construct(produced={"values": Produced.of(shapes, "float32")}))

    async def gae(self, req: WorkRequest[NoParams]) -> dict[str, Any]:
        names = ["response_ids", "reward", "values"]
        meta = need_batch(req.batch, "gae", names)
        cols = await req.client.fetch(meta, names)
        lengths = cols["response_ids"].lengths()  # (B,)
        values = Column(cols["values"].data).padded()  # (B, R)
        if values.dim() == 1:
            values = values.unsqueeze(1)
        R = values.shape[1]
        mask = (torch.arange(R).unsqueeze(0) < lengths.unsqueeze(1)).float()  # (B, R)
        adv, ret = gae_advantages(
            cols["reward"].stacked().float(), values, mask, self.gamma, self.lam
        )
        if self.whiten and mask.sum() > 1:
            adv = masked_whiten(adv, mask)
        adv_rows = [adv[i, : int(n)].contiguous() for i, n in enumerate(lengths)]
        ret_rows = [ret[i, : int(n)].contiguous() for i, n in enumerate(lengths)]
        sa = req.unit.put("advantages", meta.rows, adv_rows)
        sr = req.unit.put("returns", meta.rows, ret_rows)
        produced = {"advantages": Produced.of(sa, "float32"), "returns": Produced.of(sr, "float32")}
        return wire(WorkResult.model_construct(produced=produced))


def make_trainer_role(settings: TrainerSettings) -> TrainerRole:
    """The trainer role these settings are for."""
    if isinstance(settings, ActorSettings):
        return ActorRole(settings)
    if isinstance(settings, CriticSettings):
        return CriticRole(settings)
    if isinstance(settings, ReferenceSettings):
        return ReferenceRole(settings)
    raise ValueError(f"not a trainer role's settings: {type(settings).__name__}")
