"""vLLM rollout engine: continuous batching inside the rollout worker, weights reloaded in place.

Owns one vLLM V1 engine and exposes it as a :class:`RolloutEngine` (token ids in, token ids and
the behaviour policy's per-token log-probs out).

Design. The engine core runs *in this process* (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so
``LLMEngine`` uses vLLM's in-process core client and a single-process executor) and is owned by
one dedicated thread, the *engine thread*, which builds the engine, admits and aborts requests,
steps it, and resolves each request's asyncio future with ``loop.call_soon_threadsafe``. The
asyncio side never touches vLLM objects; it only posts commands to a thread-safe queue. When no
request is in flight the engine thread blocks on that queue (no polling).

Why not ``AsyncLLM`` + ``collective_rpc``: with the engine core in another process, new weights
would have to travel to that process (pickled over its ZMQ socket, a second copy of every bucket,
or a second communicator opened inside the core). In-process, the weights that the
:class:`~asyncflow.engines.weight_sync.WeightReceiver` yields are handed straight to the model
runner's ``reload_weights(weights_iterator=...)`` between two engine steps: that path works on
the CPU build, where plain ``model.load_weights`` breaks because the CPU backend repacks weights
after loading, and on the GPU build alike (the model runner picks the device). Nothing else can
run on the engine between steps, so a reload is atomic with respect to scheduling.

Semantics worth knowing:

- ``load_weights`` runs between two steps; requests already in flight continue on the new
  weights (their KV cache from the old ones is kept). A completion reports the policy version
  in force when it was admitted, the *oldest* version that contributed to it, which is the safe
  side of the staleness bound. Its log-probs are per token from the weights that sampled it.
  The prefix cache is reset after every reload so new requests never reuse stale KV.
- Log-probs default to ``processed_logprobs``: log-probabilities of the distribution actually
  sampled from (after temperature, top-k, top-p), i.e. the behaviour policy. With temperature 1
  and no truncation they equal a plain float32 ``log_softmax`` of the model's logits.
- ``abort`` resolves the request with ``finish_reason="abort"`` and no tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncflow.engines.protocols import Completion, SamplingConfig

_STOP = object()


@dataclass(slots=True)
class _Pending:
    """One request in flight: where its result goes and the version that admitted it."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Completion]
    version: int


@dataclass(slots=True)
class _Command:
    """Work for the engine thread: ``fn(engine)``; its result resolves ``future`` (if any)."""

    fn: Callable[[Any], Any]
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Set a future's outcome unless it was cancelled meanwhile (runs on the future's loop)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _resolve_all(results: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, result in results:
        _resolve(future, result, None)


class VLLMRolloutEngine:
    """A :class:`RolloutEngine` over an in-process vLLM V1 engine driven by its own thread."""

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int = 512,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.25,
        cpu_kvcache_space_gib: int = 1,
        cpu_threads_bind: str | None = None,
        enforce_eager: bool = True,
        max_num_seqs: int = 256,
        enable_prefix_caching: bool = True,
        logprobs_mode: str = "processed_logprobs",
        initial_version: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Configure (not start) the engine.

        ``cpu_kvcache_space_gib`` and ``cpu_threads_bind`` only matter on the CPU build (they set
        ``VLLM_CPU_KVCACHE_SPACE`` / ``VLLM_CPU_OMP_THREADS_BIND`` unless already set, e.g.
        ``"0-1"`` to use two cores); ``gpu_memory_utilization`` bounds memory on either build.
        ``engine_kwargs`` go to ``vllm.EngineArgs`` verbatim and win over the rest.
        """
        self._args: dict[str, Any] = {
            "model": model,
            "max_model_len": max_model_len,
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            "max_num_seqs": max_num_seqs,
            "enable_prefix_caching": enable_prefix_caching,
            "logprobs_mode": logprobs_mode,
            "skip_tokenizer_init": True,
            "disable_log_stats": True,
            **(engine_kwargs or {}),
        }
        self._env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        self._env_defaults = {"VLLM_CPU_KVCACHE_SPACE": str(cpu_kvcache_space_gib)}
        if cpu_threads_bind is not None:
            self._env_defaults["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind
        self._version = initial_version
        self._commands: queue.SimpleQueue[_Command | object] = queue.SimpleQueue()
        self._pending: dict[str, _Pending] = {}  # touched by the engine thread only
        self._thread: threading.Thread | None = None
        #: set by the engine thread as it exits; under the lock, so that no command can be
        #: queued after the thread has failed the ones left in the queue
        self._closed = False
        self._post_lock = threading.Lock()
        self._eos_token_ids: list[int] = []
        #: how the last :meth:`load_weights` loaded: ``"fast"`` (straight into the CPU
        #: kernels, see ``engines/vllm_reload.py``) or ``"generic"`` (vLLM's reload_weights)
        self.last_reload = ""

    @property
    def policy_version(self) -> int:
        """The weights version that new requests are generated with."""
        return self._version

    @property
    def eos_token_ids(self) -> list[int]:
        """The model's end-of-sequence token ids (known after :meth:`start`)."""
        return list(self._eos_token_ids)

    async def start(self) -> None:
        """Build the engine in its thread (20-60 s on CPU); returns when it is ready to serve."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        os.environ.update(self._env)
        for key, value in self._env_defaults.items():
            os.environ.setdefault(key, value)
        self._closed = False
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready), name="vllm-engine", daemon=True
        )
        self._thread.start()
        await ready

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingConfig
    ) -> Completion:
        """Generate one completion; many calls may be awaited concurrently (continuous batching).

        Stops on EOS (``finish_reason="stop"``) or after ``sampling.max_new_tokens`` tokens
        (``"length"``). ``request_id`` must be unique among requests in flight.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Completion] = loop.create_future()
        prompt = list(prompt_ids)

        def admit(engine: Any) -> None:
            if request_id in self._pending:
                raise ValueError(f"request id {request_id!r} is already in flight")
            from vllm.inputs import TokensPrompt

            params = _sampling_params(sampling, self._eos_token_ids)
            engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
            self._pending[request_id] = _Pending(loop, future, self._version)

        admitted: asyncio.Future[None] = loop.create_future()
        self._post(_Command(admit, loop, admitted))
        await admitted
        try:
            return await future
        except asyncio.CancelledError:
            self._post(_Command(lambda engine: self._abort_now(engine, request_id)))
            raise

    async def abort(self, request_id: str) -> None:
        """Stop a request; its ``generate`` returns ``finish_reason="abort"`` with no tokens."""
        await self._call(lambda engine: self._abort_now(engine, request_id))

    async def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load ``(name, tensor)`` pairs (HF checkpoint names) in place between two steps.

        The iterable is consumed on the engine thread, so a lazily receiving iterator (e.g.
        :meth:`WeightReceiver.receive`) streams straight into the model while generation pauses
        for the duration; pass a materialised list to receive while generation continues.
        """

        def reload(engine: Any) -> None:
            paths = engine.collective_rpc(_reload_in_worker, args=(iter(weights),))
            engine.reset_prefix_cache()
            self._version = version
            self.last_reload = str(paths[0]) if paths else "generic"

        await self._call(reload)

    async def close(self) -> None:
        """Abort everything in flight, stop the engine thread and free the engine."""
        if self._thread is None:
            return
        self._commands.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def _call(self, fn: Callable[[Any], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._post(_Command(fn, loop, future))
        return await future

    def _post(self, command: _Command) -> None:
        with self._post_lock:
            if self._closed or self._thread is None or not self._thread.is_alive():
                raise RuntimeError("engine is not running (call start() first)")
            self._commands.put(command)

    # ---- everything below runs on the engine thread ------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            engine = self._build()
        except BaseException as error:  # report start-up failures to start()'s caller
            self._close_queue()
            loop.call_soon_threadsafe(_resolve, ready, None, error)
            return
        loop.call_soon_threadsafe(_resolve, ready, None, None)
        try:
            self._serve(engine)
        finally:
            # commands queued behind the stop (e.g. a request admitted while closing) would
            # otherwise never be answered and their callers would wait forever
            self._close_queue()
            for request_id in list(self._pending):
                self._finish_aborted(request_id)
            del engine

    def _close_queue(self) -> None:
        with self._post_lock:
            self._closed = True
        closed = RuntimeError("engine closed")
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Command) and command.future is not None:
                assert command.loop is not None
                with contextlib.suppress(RuntimeError):  # that caller's loop is gone
                    command.loop.call_soon_threadsafe(_resolve, command.future, None, closed)

    def _build(self) -> Any:
        from vllm import EngineArgs, LLMEngine
        from vllm.platforms import current_platform

        args = dict(self._args)
        if current_platform.is_cpu():
            # A prompt split across two engine steps (chunked prefill, when a step's prompts
            # exceed its token budget: e.g. 64 prompts of 80 tokens) makes vLLM 0.32 move the
            # request's seeded generator back with ``set_offset``, which CPU generators lack:
            # the engine dies ("CPU Generator does not use offset"). Every rollout request is
            # seeded, so on CPU prompts are scheduled whole.
            args.setdefault("enable_chunked_prefill", False)
        engine = LLMEngine.from_engine_args(EngineArgs(**args))
        eos = getattr(engine.model_config.hf_config, "eos_token_id", None)
        self._eos_token_ids = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
        return engine

    def _serve(self, engine: Any) -> None:
        while True:
            busy = engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=not busy)
            except queue.Empty:
                command = None
            while command is not None:
                if command is _STOP:
                    return
                assert isinstance(command, _Command)
                self._execute(engine, command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if engine.has_unfinished_requests():
                done: dict[asyncio.AbstractEventLoop, list[tuple[Any, Completion]]] = {}
                for output in engine.step():
                    if output.finished:
                        self._finish(output, done)
                # one wake-up of each waiting event loop per engine step, not one per request
                for loop, results in done.items():
                    loop.call_soon_threadsafe(_resolve_all, results)

    def _execute(self, engine: Any, command: _Command) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = command.fn(engine)
        except Exception as exc:
            error = exc
        if command.future is not None and command.loop is not None:
            command.loop.call_soon_threadsafe(_resolve, command.future, result, error)

    def _finish(
        self,
        output: Any,
        done: dict[asyncio.AbstractEventLoop, list[tuple[Any, Completion]]],
    ) -> None:
        pending = self._pending.pop(output.request_id, None)
        if pending is None:
            return
        sample = output.outputs[0]
        token_ids = list(sample.token_ids)
        logprobs = _sampled_logprobs(sample.logprobs, token_ids)
        reason = "length" if sample.finish_reason == "length" else "stop"
        if sample.finish_reason == "abort":
            reason = "abort"
        completion = Completion(token_ids, logprobs, reason, pending.version)
        done.setdefault(pending.loop, []).append((pending.future, completion))

    def _abort_now(self, engine: Any, request_id: str) -> None:
        if request_id in self._pending:
            engine.abort_request([request_id])
            self._finish_aborted(request_id)

    def _finish_aborted(self, request_id: str) -> None:
        pending = self._pending.pop(request_id)
        completion = Completion([], [], "abort", pending.version)
        pending.loop.call_soon_threadsafe(_resolve, pending.future, completion, None)


def _reload_in_worker(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Runs on the (in-process) worker: reload in place, fast where it can be; returns which
    path loaded the update (``"fast"`` or ``"generic"``).

    On the CPU backend :class:`~asyncflow.engines.vllm_reload.FastCPUReload` puts the new
    weights straight into the kernels (about 5 ms instead of 20-30 ms for the tiny model). When
    it declines an update (an unexpected name, a fused layer with only some of its parts),
    vLLM's generic ``reload_weights`` loads that update, including the tensors the fast path
    already read; a model it cannot handle at all (another backend, quantised layers) always
    takes the generic path.

    A tied ``lm_head`` receives no weights of its own (the checkpoint has only the embedding),
    so the generic layerwise reload never re-processes it; on the CPU build that leaves the
    GEMM kernel packed from the old embedding. Re-running its post-load processing repacks it
    from the (already updated, shared) embedding storage; elsewhere that processing is a no-op.
    """
    from asyncflow.engines.vllm_reload import FastCPUReload, Unsupported

    model = worker.model_runner.get_model()
    if not hasattr(worker, "_asyncflow_fast_reload"):
        try:
            worker._asyncflow_fast_reload = FastCPUReload(model)
        except Unsupported as why:
            worker._asyncflow_fast_reload = None
            _warn(f"fast weight reload not used: {why}")
    fast: FastCPUReload | None = worker._asyncflow_fast_reload
    source = iter(weights)
    if fast is not None:
        seen: list[tuple[str, torch.Tensor]] = []

        def recording() -> Iterator[tuple[str, torch.Tensor]]:
            for item in source:
                seen.append(item)
                yield item

        try:
            fast.load(recording())
            return "fast"
        except Unsupported as why:
            _warn(f"fast weight reload declined this update ({why}); using vLLM's reload")
            source = itertools.chain(seen, source)
    worker.reload_weights(weights_iterator=source)
    lm_head = getattr(model, "lm_head", None)
    config = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    quant_method = getattr(lm_head, "quant_method", None)
    if lm_head is not None and config and quant_method is not None:
        quant_method.process_weights_after_loading(lm_head)
    return "generic"


def _warn(message: str) -> None:
    print(f"asyncflow vllm engine: {message}", file=sys.stderr, flush=True)


def _sampled_logprobs(logprobs: Any, token_ids: list[int]) -> list[float]:
    """The log-prob of each sampled token, from vLLM's flat container (one entry per position
    with ``logprobs=0``: the sampled token) or from its list of per-position dicts."""
    starts = getattr(logprobs, "start_indices", None)
    if starts is not None:  # FlatLogprobs
        ids, values = logprobs.token_ids, logprobs.logprobs
        out = [values[i] for i in starts]
        if [ids[i] for i in starts] != token_ids:
            raise RuntimeError("vLLM returned log-probs of tokens other than the sampled ones")
        return out
    return [float(logprobs[i][tok].logprob) for i, tok in enumerate(token_ids)]


def _sampling_params(sampling: SamplingConfig, eos_token_ids: list[int]) -> Any:
    """vLLM sampling parameters for one request: the sampled token's log-prob, stop at EOS.

    With ``skip_tokenizer_init`` vLLM knows no EOS of its own, so the model config's EOS ids are
    passed as stop tokens; the EOS token is kept in the output (the trainer learns to stop).
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        max_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else 0,
        seed=sampling.seed,
        logprobs=0,
        flat_logprobs=True,  # flat lists instead of a dict of Logprob objects per token
        stop_token_ids=[] if sampling.ignore_eos else eos_token_ids,
        ignore_eos=sampling.ignore_eos,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


__all__ = ["VLLMRolloutEngine"]
