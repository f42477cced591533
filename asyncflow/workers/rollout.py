"""The ``rollout`` role: generates responses with a rollout engine and keeps them in its unit.

=================  ===========================================  ==============================
op                 consumes                                     produces (in this unit)
=================  ===========================================  ==============================
``generate``       whole groups; row meta ``index`` (dataset)   ``prompt_ids``, ``response_ids``,
                                                                ``rollout_logprobs`` (ragged)
``evaluate``       params: dataset ``indices`` of the eval set  accuracy (greedy), no tensors
``sync_init``      params: rendezvous of the weight-sync group  --
``sync_recv``      a weight update broadcast by the trainer     the engine serves its version
=================  ===========================================  ==============================

The engine (vLLM by default, transformers as the second adapter) is chosen by settings; this
module only sees the :class:`~asyncflow.engines.protocols.RolloutEngine` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import torch

from asyncflow.engines.protocols import Completion, RolloutEngine, SamplingConfig
from asyncflow.rewards.functions import RewardScorer
from asyncflow.roles.ops import (
    EvaluateMetrics,
    EvaluateParams,
    EvaluateResult,
    GenerateMetrics,
    GenerateParams,
    GenerateResult,
    NoParams,
    OkResult,
    Produced,
    RolloutSyncInitParams,
    Sampling,
    SamplingOverrides,
    SyncRecvMetrics,
    SyncRecvResult,
    wire,
)
from asyncflow.roles.settings import RolloutSettings, parse_settings
from asyncflow.tasks.sources import (
    eval_source,
    prompt_row,
    resolve_model,
    reward_spec,
    train_source,
)
from asyncflow.transfer.framing import dtype_name
from asyncflow.transfer.service import BadRequest
from asyncflow.transfer.storage import ColumnData
from asyncflow.workers.server import Op, WorkRequest, log, need_batch, parse_params

#: how far a regenerated row's sampling seed moves per regeneration (beyond any row id)
REGEN_SEED_STRIDE = 1 << 40


def make_engine(settings: RolloutSettings, model_dir: str) -> RolloutEngine:
    """The configured rollout engine, imported only when chosen."""
    if settings.engine == "vllm":
        from asyncflow.engines.vllm_engine import VLLMRolloutEngine

        v = settings.vllm
        return VLLMRolloutEngine(
            model_dir,
            max_model_len=settings.max_model_len,
            dtype=v.dtype,
            seed=settings.seed,
            gpu_memory_utilization=v.gpu_memory_utilization,
            cpu_kvcache_space_gib=v.cpu_kvcache_space_gib,
            cpu_threads_bind=v.cpu_threads_bind,
            enforce_eager=v.enforce_eager,
            max_num_seqs=v.max_num_seqs,
        )
    from asyncflow.engines.hf_engine import HFRolloutEngine

    return HFRolloutEngine(model_dir, seed=settings.seed)


class StepOrder:
    """Admission in step order: a batch of step ``s`` enters the engine only once no batch of an
    older step is still generating in this worker.

    With one-step-off asynchrony the controller sends step ``s + 1``'s prompts as soon as version
    ``s`` is loaded, usually while step ``s``'s long tail is still generating. Sharing the engine
    would slow that tail down, and the tail is what the trainer -- and through the weight sync,
    the next step's rollout -- waits for. Generating the older step first finishes it sooner and
    costs no throughput: on CPU a decode step's cost grows with the number of sequences in it.
    Older batches are never held back (a regenerated group of an old step goes straight in).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._running: Counter[int] = Counter()  # step -> batches generating (only > 0 kept)
        self._waiters: set[asyncio.Future[None]] = set()

    def running(self) -> dict[int, int]:
        return dict(self._running)

    @contextlib.asynccontextmanager
    async def turn(self, step: int) -> AsyncIterator[None]:
        """Wait until no older step is generating, then hold a place for ``step``."""
        if not self.enabled:
            yield
            return
        while any(k < step for k in self._running):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)
        self._running[step] += 1
        try:
            yield
        finally:  # no await here: a cancelled batch always gives its place back
            self._running[step] -= 1
            if self._running[step] <= 0:
                del self._running[step]
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)


class RolloutRole:
    name = "rollout"

    def __init__(self, settings: RolloutSettings | Mapping[str, Any]) -> None:
        """``settings``: typed, or a (partial) mapping over the default config's."""
        self.settings = s = cast(RolloutSettings, parse_settings("rollout", settings))
        self.model_dir = str(resolve_model(s.model))
        self.train = train_source(s.data, s.seed, self.model_dir)
        self.eval = eval_source(s.data, s.eval, s.seed, self.model_dir)
        if self.eval.skipped:  # the training set's bad rows are reported by the controller
            line, why = self.eval.skipped[0]
            log(
                f"eval set {self.eval.name}: skipped {len(self.eval.skipped)} bad rows "
                f"(first: line {line}: {why}); evaluating {len(self.eval)}"
            )
        #: the worker's sampling defaults (a request's ``params.sampling`` goes over them)
        self.sampling = s.sampling.model_dump()
        self.engine = make_engine(s, self.model_dir)
        self.tokenizer: Any = None
        self.receiver: Any = None
        self.tokens_out = 0
        self.requests = 0
        self._req = 0
        self._admission = StepOrder(s.step_ordered)

    async def start(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        t0 = time.monotonic()
        await self.engine.start()
        log(f"rollout engine {self.settings.engine} started in {time.monotonic() - t0:.1f} s")

    def ops(self) -> Mapping[str, Op]:
        return {
            "generate": self.generate,
            "evaluate": self.evaluate,
            "sync_init": self.sync_init,
            "sync_recv": self.sync_recv,
        }

    def info(self) -> dict[str, Any]:
        return {
            "policy_version": self.engine.policy_version,
            # what the weight sync's backend "auto" goes by (NCCL needs every end on CUDA)
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "tokens_out": self.tokens_out,
            "requests": self.requests,
        }

    async def close(self) -> None:
        await self.engine.close()
        if self.receiver is not None:
            self.receiver.close()

    # ------------------------------------------------------------------ ops
    def _encode(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(prompt)
        return ids

    def _sampling(self, overrides: SamplingOverrides, *, greedy: bool = False) -> Sampling:
        """The worker's sampling settings (``greedy``: temperature 0) with the request's
        ``params.sampling`` over them, checked (a bad setting is named where a client would
        have put it)."""
        base = {**self.sampling, **({"temperature": 0.0} if greedy else {})}
        return parse_params(
            Sampling, {**base, **overrides.model_dump(exclude_none=True)}, "params.sampling"
        )

    async def _complete(self, prompt_ids: list[int], sampling: SamplingConfig) -> Completion:
        self._req += 1
        rid = f"r{self._req}"
        try:
            return await self.engine.generate(rid, prompt_ids, sampling)
        except asyncio.CancelledError:
            await self.engine.abort(rid)
            raise

    async def generate(self, req: WorkRequest[GenerateParams]) -> dict[str, Any]:
        batch = need_batch(req.batch, "generate")
        base_seed = req.params.seed
        base = self._sampling(req.params.sampling)
        # a row's seed: the run's base + its row id (a recomputed row draws the same sample),
        # moved on for each time its group was regenerated (a failed reward must not be
        # answered with the same response again)
        again = [m.get("regenerated", 0) for m in batch.meta]
        again = [a if type(a) is int and a >= 0 else 0 for a in again]
        sampling = {
            rid: SamplingConfig(
                **base.model_dump(),
                seed=None if base_seed is None else base_seed + rid + REGEN_SEED_STRIDE * a,
            )
            for rid, a in zip(batch.rows, again)
        }
        steps = [m.get("step", -1) for m in batch.meta]
        if not all(type(st) is int for st in steps):
            bad = next(st for st in steps if type(st) is not int)
            raise BadRequest(f"generate: batch.meta step must be an integer, got {bad!r:.40}")
        encoded: dict[Any, list[int]] = {}  # a GRPO group is n samples of one prompt
        prompts = []
        for m in batch.meta:
            key = m.get("index")
            ids = encoded.get(key) if type(key) is int else None
            if ids is None:
                ids = self._encode(prompt_row(self.train, m).prompt)  # validates the index
                encoded[key] = ids
            prompts.append(ids)
        async with self._admission.turn(min(steps)):
            outs = await asyncio.gather(
                *(self._complete(p, sampling[rid]) for p, rid in zip(prompts, batch.rows))
            )
        resp = [torch.tensor(c.token_ids, dtype=torch.int64) for c in outs]
        lps = [torch.tensor(c.logprobs, dtype=torch.float32) for c in outs]
        pids = [torch.tensor(p, dtype=torch.int64) for p in prompts]
        self.tokens_out += sum(len(c.token_ids) for c in outs)
        self.requests += len(outs)
        version = min(c.policy_version for c in outs)
        produced = {}
        for name, ts in (("prompt_ids", pids), ("response_ids", resp), ("rollout_logprobs", lps)):
            shapes = req.unit.put(name, batch.rows, _ragged(ts))
            produced[name] = Produced.model_construct(
                shapes=[list(s) for s in shapes], dtype=dtype_name(ts[0].dtype), version=version
            )
        metrics = GenerateMetrics.model_construct(
            versions=[c.policy_version for c in outs],
            response_lengths=[len(c.token_ids) for c in outs],
            finish=[c.finish_reason for c in outs],
        )
        return wire(GenerateResult.model_construct(produced=produced, metrics=metrics))

    async def evaluate(self, req: WorkRequest[EvaluateParams]) -> dict[str, Any]:
        p = req.params
        if p.indices is None:
            indices = list(range(len(self.eval)))
        else:
            indices = p.indices
            if bad := [i for i in indices if i >= len(self.eval)]:
                raise LookupError(
                    f"params.indices names eval row {bad[0]}; the eval set {self.eval.name} "
                    f"has {len(self.eval)} rows"
                )
        rows = [self.eval[i] for i in indices]
        greedy = SamplingConfig(**self._sampling(p.sampling, greedy=True).model_dump())
        try:  # a bad reward is the request's mistake: refuse it before generating
            spec, trusted = reward_spec(p.reward)
            scorer = RewardScorer(spec, isolate=not trusted, timeout_s=p.timeout_s)
        except BadRequest:
            raise
        except ValueError as e:
            raise BadRequest(f"params.reward: {e}") from None
        outs = await asyncio.gather(*(self._complete(self._encode(r.prompt), greedy) for r in rows))
        async with scorer:
            texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in outs]
            results = await asyncio.gather(
                *(scorer.score(r.prompt, t, r.answer) for r, t in zip(rows, texts))
            )
        scores = [r.score for r in results]
        metrics = EvaluateMetrics.model_construct(
            accuracy=sum(s > 0 for s in scores) / max(len(scores), 1),
            mean_reward=sum(scores) / max(len(scores), 1),
            n=len(scores),
            skipped_rows=len(self.eval.skipped),  # bad rows left out of the eval set
            version=min((c.policy_version for c in outs), default=self.engine.policy_version),
            mean_length=sum(len(c.token_ids) for c in outs) / max(len(outs), 1),
            examples=[(r.prompt, t) for r, t in list(zip(rows, texts))[:3]],
        )
        return wire(EvaluateResult.model_construct(metrics=metrics))

    async def sync_init(self, req: WorkRequest[RolloutSyncInitParams]) -> dict[str, Any]:
        from asyncflow.engines.weight_sync import WeightReceiver

        p = req.params
        if self.receiver is not None:  # the group is being formed anew (a worker was replaced)
            self.receiver.close()
        self.receiver = WeightReceiver(
            p.host, p.port, p.rank, p.world_size, backend=p.backend, timeout_s=p.timeout_s
        )
        await self.receiver.aconnect()
        return wire(OkResult.model_construct(ok=True))

    async def sync_recv(self, req: WorkRequest[NoParams]) -> dict[str, Any]:
        if self.receiver is None:
            raise BadRequest("sync_recv before sync_init")
        t0 = time.monotonic()
        update = await self.receiver.areceive()
        t1 = time.monotonic()
        await self.engine.load_weights(update, update.version)
        metrics = SyncRecvMetrics.model_construct(
            version=update.version,
            recv_s=t1 - t0,
            total_s=time.monotonic() - t0,
            reload=getattr(self.engine, "last_reload", ""),
        )
        return wire(SyncRecvResult.model_construct(metrics=metrics))


def _ragged(ts: list[torch.Tensor]) -> ColumnData:
    lengths = torch.tensor([len(t) for t in ts], dtype=torch.int64)
    values = torch.cat(ts) if ts else torch.empty(0)
    return ColumnData(values, lengths)
