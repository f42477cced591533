"""The controller's live metrics: a Prometheus-format ``/metrics`` endpoint on localhost.

Served while a run is going (``run.metrics_port``: 0 picks a free port, written to
``RUN_DIR/metrics_url``; ``null`` turns it off). Names (all gauges unless ``_total``):

=====================================  =========================================================
``asyncflow_step``                     training steps completed
``asyncflow_policy_version``           the policy version the rollout engines serve
``asyncflow_samples_trained_total``    samples that entered an optimizer step
``asyncflow_tokens_generated_total``   response tokens of those samples
``asyncflow_reward_mean``              mean reward of the last step's samples
``asyncflow_accuracy``                 fraction of the last step's samples with reward > 0
``asyncflow_eval_accuracy``            the last held-out evaluation's accuracy
``asyncflow_samples_per_second``       the last step's throughput
``asyncflow_tokens_per_second``        the last step's generated tokens per second
``asyncflow_staleness_mean``           mean (step - generating version) of the last step
``asyncflow_worker_idle_fraction``     per ``worker`` label: idle share of the last step
``asyncflow_worker_restarts_total``    workers that died and were replaced
``asyncflow_reward_failures_total``    reward calls that raised or timed out
``asyncflow_index_rows``               rows resident in the sample index
=====================================  =========================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

NAMES = (
    "asyncflow_step",
    "asyncflow_policy_version",
    "asyncflow_samples_trained_total",
    "asyncflow_tokens_generated_total",
    "asyncflow_reward_mean",
    "asyncflow_accuracy",
    "asyncflow_eval_accuracy",
    "asyncflow_samples_per_second",
    "asyncflow_tokens_per_second",
    "asyncflow_staleness_mean",
    "asyncflow_worker_idle_fraction",
    "asyncflow_worker_restarts_total",
    "asyncflow_reward_failures_total",
    "asyncflow_index_rows",
)


class MetricsExporter:
    def __init__(self, index_rows: Callable[[], int]) -> None:
        self.values: dict[str, float] = {n: 0.0 for n in NAMES if n != NAMES[10]}
        self.idle: dict[str, float] = {}
        self._index_rows = index_rows
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    def step(self, rec: dict[str, Any]) -> None:
        v = self.values
        v["asyncflow_step"] = rec["step"] + 1
        v["asyncflow_policy_version"] = rec["version"]
        v["asyncflow_samples_trained_total"] += rec["samples"]
        v["asyncflow_tokens_generated_total"] += rec["response_tokens"]
        for key, name in (
            ("reward_mean", "asyncflow_reward_mean"),
            ("accuracy", "asyncflow_accuracy"),
            ("samples_per_s", "asyncflow_samples_per_second"),
            ("tokens_per_s", "asyncflow_tokens_per_second"),
            ("staleness_mean", "asyncflow_staleness_mean"),
            ("eval_accuracy", "asyncflow_eval_accuracy"),
            ("reward_failures", "asyncflow_reward_failures_total"),
        ):
            if key in rec:
                v[name] = float(rec[key])
        self.idle = dict(rec.get("idle_frac", {}))

    def event(self, rec: dict[str, Any]) -> None:
        if rec.get("event") == "eval":
            self.values["asyncflow_eval_accuracy"] = float(rec["eval_accuracy"])
        elif rec.get("event") == "worker_replaced":
            self.values["asyncflow_worker_restarts_total"] += 1

    def render(self) -> str:
        self.values["asyncflow_index_rows"] = float(self._index_rows())
        out = []
        for name, value in self.values.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            out += [f"# TYPE {name} {kind}", f"{name} {value:g}"]
        out.append("# TYPE asyncflow_worker_idle_fraction gauge")
        out += [
            f'asyncflow_worker_idle_fraction{{worker="{w}"}} {f:g}'
            for w, f in sorted(self.idle.items())
        ]
        return "\n".join(out) + "\n"

    async def start(self, port: int, host: str = "127.0.0.1") -> str:
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(text=self.render(), content_type="text/plain", charset="utf-8")

        app = web.Application()
        app.add_routes([web.get("/metrics", metrics)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}/metrics"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
