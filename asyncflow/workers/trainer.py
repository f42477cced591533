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
from typing import Any

import torch

from asyncflow.algorithms.advantages import gae_advantages, masked_whiten
from asyncflow.algorithms.losses import PolicyLossConfig
from asyncflow.algorithms.objectives import ADVANTAGES, PolicyObjective, ValueObjective
from asyncflow.engines.protocols import LossContext
from asyncflow.tasks.sources import resolve_model
from asyncflow.transfer.client import Column
from asyncflow.transfer.service import BadRequest
from asyncflow.workers.batches import (
    build_train_batch,
    response_values,
    rows_with_signal,
    select_rows,
)
from asyncflow.workers.params import (
    SYNC_BACKENDS,
    int_param,
    need_batch,
    number_param,
    str_list_param,
    str_param,
)
from asyncflow.workers.server import Op, Produced, WorkRequest


def _engine_config(settings: Mapping[str, Any]) -> Any:
    from asyncflow.engines.torch_trainer import OptimizerConfig, TrainerConfig

    return TrainerConfig(
        optimizer=OptimizerConfig(
            lr=float(settings.get("lr", 3e-5)),
            weight_decay=float(settings.get("weight_decay", 0.0)),
            warmup_steps=int(settings.get("warmup_steps", 0)),
            max_grad_norm=float(settings.get("max_grad_norm", 1.0)),
        ),
        seed=int(settings.get("seed", 0)),
        temperature=float(settings.get("temperature", 1.0)),
        device=settings.get("device"),
        mixed_precision=str(settings.get("mixed_precision", "fp32")),
        shared_prefix=bool(settings.get("shared_prefix", True)),
    )


def _dist_config(settings: Mapping[str, Any]) -> Any:
    from asyncflow.engines.torch_trainer import DistributedConfig

    d = settings.get("distributed", {})
    return DistributedConfig(
        rank=int(d.get("rank", 0)),
        world_size=int(d.get("world_size", 1)),
        master_addr=str(d.get("master_addr", "127.0.0.1")),
        master_port=int(d.get("master_port", 29500)),
    )


class TrainerRole:
    """Shared by the three roles: an engine, batch building, per-step accumulation."""

    def __init__(self, role: str, settings: Mapping[str, Any]) -> None:
        self.name = role
        self.settings = dict(settings)
        self.model_dir = str(resolve_model(self.settings.get("model", "builtin:tiny-adder")))
        if self.settings.get("threads"):
            torch.set_num_threads(int(self.settings["threads"]))
        self.engine: Any = None
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

    def _build(self) -> Any:
        from asyncflow.engines.critic import TorchCriticEngine
        from asyncflow.engines.torch_trainer import TorchTrainingEngine

        cls = TorchCriticEngine if self.name == "critic" else TorchTrainingEngine
        return cls(
            self.model_dir,
            _engine_config(self.settings),
            _dist_config(self.settings),
            trainable=self.name != "reference",
        )

    def info(self) -> dict[str, Any]:
        step = self.engine.step if self.engine is not None else 0
        return {"policy_version": step, "compute_s": self.busy_s}

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

    def _step_params(self, params: Mapping[str, Any]) -> tuple[tuple[int, int], float, int]:
        """``(step, attempt)``, global tokens and sequences of a ``train_micro``/``finish``."""
        key = (int_param(params, "step"), int_param(params, "attempt", 0))
        tokens = number_param(params, "global_tokens", positive=True)
        return key, tokens, int_param(params, "global_sequences", low=1)

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

    async def train_micro(self, req: WorkRequest) -> dict[str, Any]:
        key, tokens, sequences = self._step_params(req.params)
        cols = tuple(str_list_param(req.params, "columns", []))
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

        return {"metrics": await self._run(work)}

    async def finish(self, req: WorkRequest) -> dict[str, Any]:
        key, tokens, sequences = self._step_params(req.params)
        self._refuse_stale(key)
        if self._stream_step != key:  # this rank got no micro-batch: join with zero grads
            self._begin(key, tokens, sequences)
        self._stream_step = None
        async with self._weights_lock:
            metrics = await self._run(self.engine.finish_step)
        trained, skipped = self._rows
        if trained + skipped:
            metrics["trained_rows_frac"] = trained / (trained + skipped)
        return {"metrics": metrics, "version": self.engine.step}

    def _prune(self, batch: Any) -> tuple[Any, int]:
        """The rows of a micro-batch worth a forward/backward, and how many were dropped."""
        return batch, 0

    def _loss_fn(self) -> Any:
        raise NotImplementedError

    def ops(self) -> Mapping[str, Op]:
        raise NotImplementedError

    async def save(self, req: WorkRequest) -> dict[str, Any]:
        path = str_param(req.params, "path")
        await self._run(self.engine.save, path)
        return {"ok": True, "version": self.engine.step}

    async def load(self, req: WorkRequest) -> dict[str, Any]:
        path = str_param(req.params, "path")
        if not Path(path).is_dir():  # noqa: ASYNC240 - one stat, before a long load
            raise BadRequest(f"params.path: no checkpoint folder at {path!r}", 404)
        async with self._weights_lock:
            await self._run(self.engine.load, path)
        # training goes on from the checkpoint's step (a resumed controller may count from
        # an earlier step than this process last saw)
        self._stream_step = self._newest = None
        return {"ok": True, "version": self.engine.step}


class ActorRole(TrainerRole):
    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__("actor", settings)
        loss = dict(self.settings.get("loss", {}))
        old_policy = loss.pop("old_policy", "current")
        self.objective = PolicyObjective(PolicyLossConfig(**loss), old_policy=old_policy)
        cfg = self.objective.config
        #: exact only when a zero-advantage token adds nothing to the loss: no KL, no entropy
        self.skip_zero_advantage = (
            bool(self.settings.get("skip_zero_advantage", True))
            and cfg.kl_coef == 0.0
            and cfg.entropy_coef == 0.0
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

    async def sync_init(self, req: WorkRequest) -> dict[str, Any]:
        from asyncflow.engines.weight_sync import WeightSender

        p = req.params
        args = (
            str_param(p, "host"),
            int_param(p, "port", low=1, high=65535),
            int_param(p, "world_size", low=1),
        )
        backend = str_param(p, "backend", "gloo", choices=SYNC_BACKENDS)
        bucket_mb = int_param(p, "bucket_mb", 128, low=1)
        timeout_s = number_param(p, "timeout_s", 120.0, positive=True)
        if self.sender is not None:  # the group is being formed anew (a worker was replaced)
            self.sender.close()
        self.sender = WeightSender(
            *args, backend=backend, bucket_bytes=bucket_mb << 20, timeout_s=timeout_s
        )
        await self.sender.aconnect()
        return {"ok": True}

    async def sync_send(self, req: WorkRequest) -> dict[str, Any]:
        if self.sender is None:
            raise BadRequest("sync_send before sync_init")
        # Not under the compute lock: the send mostly waits for the rollout engines to reach a
        # step boundary, and the next step's forward/backward (which only reads the weights)
        # runs meanwhile; the optimizer step waits for the weights lock.
        async with self._weights_lock:
            version = self.engine.step
            weights = list(self.engine.named_weights())
            stats = await asyncio.to_thread(self.sender.send, weights, version)
        return {"version": version, "metrics": {"seconds": stats.seconds, "bytes": stats.bytes}}


class ReferenceRole(TrainerRole):
    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__("reference", settings)

    def ops(self) -> Mapping[str, Op]:
        return {"ref_logprobs": self.ref_logprobs}

    async def ref_logprobs(self, req: WorkRequest) -> dict[str, Any]:
        batch = await self._batch(req, "ref_logprobs")
        assert req.batch is not None  # checked by _batch
        out = await self._run(self.engine.logprobs, batch)
        rows = response_values(batch, out["logprobs"])
        shapes = req.unit.put("ref_logprobs", req.batch.rows, rows)
        return {
            "produced": {"ref_logprobs": Produced([list(s) for s in shapes], "float32").to_json()}
        }


class CriticRole(TrainerRole):
    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__("critic", settings)
        self.objective = ValueObjective(clip_range=float(self.settings.get("clip_range", 0.2)))
        self.gamma = float(self.settings.get("gamma", 1.0))
        self.lam = float(self.settings.get("lam", 0.95))
        self.whiten = bool(self.settings.get("whiten_advantages", True))

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

    async def values(self, req: WorkRequest) -> dict[str, Any]:
        batch = await self._batch(req, "values")
        assert req.batch is not None  # checked by _batch
        vals = await self._run(self.engine.values, batch)
        rows = response_values(batch, vals)
        shapes = req.unit.put("values", req.batch.rows, rows)
        return {"produced": {"values": Produced([list(s) for s in shapes], "float32").to_json()}}

    async def gae(self, req: WorkRequest) -> dict[str, Any]:
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
        return {
            "produced": {
                "advantages": Produced([list(s) for s in sa], "float32").to_json(),
                "returns": Produced([list(s) for s in sr], "float32").to_json(),
            }
        }


def make_trainer_role(role: str, settings: Mapping[str, Any]) -> TrainerRole:
    if role == "actor":
        return ActorRole(settings)
    if role == "reference":
        return ReferenceRole(settings)
    if role == "critic":
        return CriticRole(settings)
    raise ValueError(f"not a trainer role: {role!r}")
