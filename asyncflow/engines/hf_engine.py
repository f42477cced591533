"""Transformers rollout engine: the fallback where vLLM is missing, and the parity reference.

Owns a transformers causal LM and serves the :class:`RolloutEngine` protocol with dynamic
batching: a batcher task collects the requests that arrive within a short window (up to
``max_batch_size``), left-pads them and generates step by step with the KV cache
(``past_key_values``) in a worker thread, so the event loop stays free. Each row stops on EOS or
its own ``max_new_tokens``; its future is resolved (thread-safely) as soon as it finishes, not at
the end of the batch. Requests that arrive during a batch wait for the next one (static batches,
unlike vLLM's continuous batching).

Sampling and log-probs come from one float32 ``log_softmax``: logits / temperature, then top-k
and top-p truncation (renormalised), then the sampled token's log-prob from that distribution,
the behaviour policy. With temperature 1 and no truncation this is the plain model log-prob; with
temperature 0 sampling is greedy and the log-prob is that of the untempered distribution.

``load_weights`` copies tensors into the parameters in place, between batches (an asyncio lock
keeps batches and loads apart); completions report the version their batch ran with.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncflow.engines.protocols import Completion, SamplingConfig


@dataclass(slots=True)
class _Request:
    """One queued or running request and where its result goes."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Completion]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    done: bool = False


def _resolve(future: asyncio.Future[Completion], completion: Completion) -> None:
    if not future.done():
        future.set_result(completion)


def sample_tokens(
    logits: torch.Tensor, rows: Sequence[SamplingConfig], generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``logits`` (B, V); returns (token ids (B,), log-probs (B,)).

    The log-prob is taken from the same float32 ``log_softmax`` the token was sampled from.
    """
    logits = logits.float()
    temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows])
    logp = torch.log_softmax(_truncate(logits / temps[:, None], rows), dim=-1)  # (B, V)
    tokens = logits.argmax(dim=-1)  # (B,) greedy rows keep these
    shared = [i for i, r in enumerate(rows) if r.temperature > 0 and r.seed is None]
    if shared:  # one draw for every row on the engine's generator
        index = torch.tensor(shared)
        draws = torch.multinomial(logp[index].exp(), 1, generator=generators[shared[0]])
        tokens[index] = draws[:, 0]
    for i, (row, gen) in enumerate(zip(rows, generators)):
        if row.temperature > 0 and row.seed is not None:  # a seeded row: its own generator
            tokens[i] = int(torch.multinomial(logp[i].exp(), 1, generator=gen))
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def _truncate(logits: torch.Tensor, rows: Sequence[SamplingConfig]) -> torch.Tensor:
    """Mask logits (B, V) outside each row's top-k / top-p set with -inf (greedy rows: none)."""
    vocab = logits.shape[-1]
    sampling_rows = [r for r in rows if r.temperature > 0]
    if all(r.top_k <= 0 and r.top_p >= 1.0 for r in sampling_rows):
        return logits
    top_k = torch.tensor([r.top_k if r.top_k > 0 and r.temperature > 0 else vocab for r in rows])
    top_p = torch.tensor([r.top_p if r.temperature > 0 else 1.0 for r in rows])
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(vocab)[None, :]
    # top-k first, then top-p over the renormalised top-k set (as vLLM and transformers do)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability mass of higher-ranked tokens
    drop = (mass_before > top_p[:, None]) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class HFRolloutEngine:
    """A :class:`RolloutEngine` over a transformers causal LM with dynamic batching."""

    def __init__(
        self,
        model: str | torch.nn.Module,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | None = None,
        max_batch_size: int = 64,
        batch_window_s: float = 0.005,
        seed: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        pad_token_id: int | None = None,
        initial_version: int = 0,
    ) -> None:
        """``model`` is a transformers folder (or hub id) or an already built causal LM.

        EOS and pad ids default to the model config's; ``device`` defaults to CUDA if available.
        The model is loaded in :meth:`start`.
        """
        self._source = model
        self._dtype = dtype
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._max_batch_size = max_batch_size
        self._window = batch_window_s
        self._generator = torch.Generator().manual_seed(seed)
        self._eos_override = list(eos_token_ids) if eos_token_ids is not None else None
        self._pad_override = pad_token_id
        self._version = initial_version
        self._model: torch.nn.Module | None = None
        self._eos: set[int] = set()
        self._pad = 0
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._running: dict[str, _Request] = {}  # read by the generation thread
        self._aborted: set[str] = set()
        self._inflight: set[str] = set()
        self._abort_lock = threading.Lock()
        self._step_lock = asyncio.Lock()  # a batch or a weight load, never both
        self._batcher: asyncio.Task[None] | None = None

    @property
    def policy_version(self) -> int:
        """The weights version that new batches are generated with."""
        return self._version

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence token ids that stop a request (known after :meth:`start`)."""
        return sorted(self._eos)

    async def start(self) -> None:
        """Load the model (in a thread) and start the batcher task."""
        self._model = await asyncio.to_thread(self._load_model)
        self._batcher = asyncio.create_task(self._batch_loop(), name="hf-engine-batcher")

    def _load_model(self) -> torch.nn.Module:
        if isinstance(self._source, torch.nn.Module):
            model = self._source
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self._source, dtype=self._dtype)
        model = model.to(self._device).eval()
        config: Any = model.config
        eos = config.eos_token_id if self._eos_override is None else self._eos_override
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = getattr(config, "pad_token_id", None)
        self._pad = self._pad_override if self._pad_override is not None else (pad or 0)
        return model

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingConfig
    ) -> Completion:
        """Queue one request; returns when it hits EOS, its max tokens, or is aborted."""
        if self._batcher is None:
            raise RuntimeError("engine is not running (call start() first)")
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        loop = asyncio.get_running_loop()
        request = _Request(request_id, list(prompt_ids), sampling, loop, loop.create_future())
        with self._abort_lock:
            if request_id in self._inflight:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._inflight.add(request_id)
        await self._queue.put(request)
        try:
            return await request.future
        except asyncio.CancelledError:
            await self.abort(request_id)
            raise

    async def abort(self, request_id: str) -> None:
        """Stop a request; its ``generate`` returns ``finish_reason="abort"`` with the tokens so
        far (none if it had not started)."""
        with self._abort_lock:
            if request_id in self._inflight:
                self._aborted.add(request_id)

    async def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy ``(name, tensor)`` pairs (state-dict names) into the model between batches."""
        async with self._step_lock:
            await asyncio.to_thread(self._copy_weights, weights)
            self._version = version

    @torch.no_grad()
    def _copy_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        assert self._model is not None
        state = self._model.state_dict()
        for name, tensor in weights:
            if name not in state:
                raise KeyError(f"unknown weight {name!r}")
            state[name].copy_(tensor)

    async def close(self) -> None:
        """Stop the batcher and resolve what is still queued as aborted."""
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
            self._batcher = None
        while not self._queue.empty():
            request = self._queue.get_nowait()
            _resolve(request.future, Completion([], [], "abort", self._version))

    async def _batch_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            try:
                await self._serve_batch(batch)
            except asyncio.CancelledError:
                # closing: a batch still being gathered, or generating in its thread, is
                # answered "abort" now (the thread skips finished requests), never dropped
                for request in batch:
                    if not request.done:
                        self._finish(request, "abort", self._version)
                raise

    async def _serve_batch(self, batch: list[_Request]) -> None:
        try:
            async with asyncio.timeout(self._window):
                while len(batch) < self._max_batch_size:
                    batch.append(await self._queue.get())
        except TimeoutError:
            pass
        live = [r for r in batch if not self._take_abort(r)]
        if live:
            async with self._step_lock:
                try:
                    await asyncio.to_thread(self._run_batch, live, self._version)
                except Exception as error:  # fail the batch's requests, keep serving
                    for request in live:
                        request.done = True
                        with self._abort_lock:
                            self._inflight.discard(request.request_id)
                        if not request.future.done():
                            request.future.set_exception(error)

    def _take_abort(self, request: _Request) -> bool:
        """Resolve ``request`` as aborted if an abort for it arrived; True if it did."""
        with self._abort_lock:
            if request.request_id not in self._aborted:
                return False
        self._finish(request, "abort", self._version)
        return True

    def _finish(self, request: _Request, reason: str, version: int) -> None:
        request.done = True
        with self._abort_lock:
            self._inflight.discard(request.request_id)
            self._aborted.discard(request.request_id)
        completion = Completion(request.token_ids, request.logprobs, reason, version)
        request.loop.call_soon_threadsafe(_resolve, request.future, completion)

    @torch.no_grad()
    def _run_batch(self, batch: list[_Request], version: int) -> None:
        """Generate for ``batch`` step by step with the KV cache (runs in a worker thread)."""
        assert self._model is not None
        input_ids, attention_mask = self._left_pad([r.prompt_ids for r in batch])
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        generators = [self._row_generator(r.sampling) for r in batch]
        rows = [r.sampling for r in batch]
        past = None
        for step in range(max(r.sampling.max_new_tokens for r in batch)):
            out = self._model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            tokens, logprobs = sample_tokens(out.logits[:, -1].cpu(), rows, generators)
            for i, request in enumerate(batch):
                if not request.done:
                    self._record(request, int(tokens[i]), float(logprobs[i]), step, version)
            if all(r.done for r in batch):
                return
            input_ids = tokens[:, None].to(self._device)  # (B, 1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(batch), 1)], 1)
            positions = positions[:, -1:] + 1

    def _record(
        self, request: _Request, token: int, logprob: float, step: int, version: int
    ) -> None:
        if self._take_abort(request):
            return
        request.token_ids.append(token)
        request.logprobs.append(logprob)
        if token in self._eos and not request.sampling.ignore_eos:
            self._finish(request, "stop", version)
        elif step + 1 >= request.sampling.max_new_tokens:
            self._finish(request, "length", version)

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) input ids and attention mask, left-padded to the longest prompt."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        return ids.to(self._device), mask.to(self._device)

    def _row_generator(self, sampling: SamplingConfig) -> torch.Generator:
        if sampling.seed is None:
            return self._generator
        return torch.Generator().manual_seed(sampling.seed)


__all__ = ["HFRolloutEngine", "sample_tokens"]
