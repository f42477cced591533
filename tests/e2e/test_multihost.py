"""End-to-end across "hosts": each worker in its own network namespace, attached by URL.

The test builds a small private network of its own -- a bridge in the root namespace and one
namespace per worker (rollout, reward, actor), each with one veth into the bridge and an address
in a random ``10.x.y.0/24`` that exists only here -- and starts the workers inside their
namespaces with ``ip netns exec NS python -m asyncflow.workers --config ... --host ADDR``, the
way a person starts them on other machines. The controller (this process, root namespace)
attaches them by URL, for three steps, once with each rollout engine (transformers, vLLM).
Nothing else reaches the workers' loopback, so the run completing means:

- tensors moved worker to worker by address (the reward worker pulls responses from the rollout
  worker, the actor pulls them and the rewards from both);
- the weight-sync group rendezvoused at the actor's address and ``sync.port`` and broadcast the
  new weights into another namespace (the rollout worker serves version ``steps`` at the end);
- the settings the workers built from ``--config`` + overrides agree with the controller's.

Needs root and iproute2; skips (saying why) where ``ip netns`` is not permitted. All traffic
stays on the addresses created here, and everything is removed at teardown.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop

from asyncflow.config import load_config
from asyncflow.controller.controller import Controller

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("rollout", "reward", "actor")
PORT = 8000  #: every worker listens on its own address at this port
SYNC_PORT = 29500  #: the weight-sync rendezvous, on the actor's address
IFNAME = "af0"  #: the interface inside every namespace
STEPS = 3
#: what both the workers (from their command line) and the controller are given
RUN_ARGS = [f"algorithm.steps={STEPS}", "eval.size=16", "eval.every=0", "run.seed=0"]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


@dataclass
class Network:
    """A bridge in the root namespace plus one namespace per worker role."""

    tag: str
    subnet: ipaddress.IPv4Network
    addrs: dict[str, str] = field(default_factory=dict)  #: role -> its address
    namespaces: dict[str, str] = field(default_factory=dict)  #: role -> namespace name

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    def host_end(self, i: int) -> str:
        return f"{self.tag}h{i}"


def _probe_netns() -> str | None:
    """Why ``ip netns`` cannot be used here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"afprobe{secrets.token_hex(3)}"
    added = ip("netns", "add", name, check=False)
    if added.returncode != 0:
        return f"`ip netns add` is not permitted here: {added.stderr.strip()}"
    ip("netns", "del", name, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no route on this machine uses (no clash with a parallel run)."""
    routes = ip("-4", "route", "show", "table", "all").stdout
    used = [
        ipaddress.ip_network(word, strict=False)
        for line in routes.splitlines()
        for word in line.split()[:2]
        if "/" in word and word[0].isdigit()
    ]
    for _ in range(100):
        net = ipaddress.ip_network(
            f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(256)}.0/24"
        )
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet")


@pytest.fixture
def network() -> Iterator[Network]:
    reason = _probe_netns()
    if reason is not None:
        pytest.skip(reason)
    net = Network(tag=f"af{secrets.token_hex(3)}", subnet=_free_subnet())
    hosts = list(net.subnet.hosts())
    try:
        ip("link", "add", net.bridge, "type", "bridge")
        ip("addr", "add", f"{hosts[0]}/{net.subnet.prefixlen}", "dev", net.bridge)
        ip("link", "set", net.bridge, "up")
        for i, role in enumerate(ROLES):
            ns, peer, addr = f"{net.tag}-{role}", f"{net.tag}p{i}", str(hosts[i + 1])
            ip("netns", "add", ns)
            net.namespaces[role] = ns
            ip("link", "add", net.host_end(i), "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "netns", ns)
            ip("-n", ns, "link", "set", peer, "name", IFNAME)
            ip("-n", ns, "addr", "add", f"{addr}/{net.subnet.prefixlen}", "dev", IFNAME)
            ip("-n", ns, "link", "set", IFNAME, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("link", "set", net.host_end(i), "master", net.bridge)
            ip("link", "set", net.host_end(i), "up")
            net.addrs[role] = addr
        yield net
    finally:
        for i in range(len(ROLES)):
            ip("link", "del", net.host_end(i), check=False)  # takes its peer with it
        for ns in net.namespaces.values():
            ip("netns", "del", ns, check=False)
        ip("link", "del", net.bridge, check=False)


@dataclass
class Worker:
    role: str
    url: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def log_tail(self, n: int = 3000) -> str:
        return self.err.read_text(errors="replace")[-n:] if self.err.exists() else ""


def start_worker(net: Network, role: str, run_args: list[str], token: str, logs: Path) -> Worker:
    """``ip netns exec NS python -m asyncflow.workers --role ROLE --host ADDR --config ...``."""
    addr = net.addrs[role]
    cmd = [
        "ip", "netns", "exec", net.namespaces[role],
        sys.executable, "-m", "asyncflow.workers",
        "--role", role, "--name", f"{role}0", "--host", addr, "--port", str(PORT),
        "--config", str(ROOT / "configs" / "tiny-grpo.yaml"), *run_args,
    ]  # fmt: skip
    env = {
        **os.environ,
        "ASYNCFLOW_TOKEN": token,
        # the hostname resolves to loopback here: tell gloo which interface reaches the peers
        "GLOO_SOCKET_IFNAME": IFNAME,
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "1",
    }
    out, err = logs / f"{role}.out", logs / f"{role}.log"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=ROOT)
    return Worker(role, f"http://{addr}:{PORT}", proc, out, err)


def wait_ready(workers: list[Worker], timeout_s: float = 300.0) -> None:
    """Until every worker printed its ready line (bounded; fails with the worker's log)."""
    deadline = time.monotonic() + timeout_s
    pending = list(workers)
    while pending:
        for w in list(pending):
            if '"event": "ready"' in w.out.read_text(errors="replace"):
                pending.remove(w)
            elif w.proc.poll() is not None:
                pytest.fail(f"{w.role} worker exited with {w.proc.returncode}:\n{w.log_tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"workers not ready after {timeout_s:.0f} s: {[w.role for w in pending]}")
        time.sleep(0.2)


def net_namespace(w: Worker) -> str:
    """The network namespace the worker's process runs in (fails if it has exited)."""
    try:
        return os.readlink(f"/proc/{w.proc.pid}/ns/net")
    except FileNotFoundError:
        code = w.proc.wait(timeout=10)
        pytest.fail(f"{w.role} worker exited with {code} after it was ready:\n{w.log_tail()}")


def stop_workers(workers: list[Worker]) -> None:
    for w in workers:
        if w.proc.poll() is None:
            w.proc.terminate()
    for w in workers:
        try:
            w.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(timeout=15)


def get_info(url: str, token: str) -> dict[str, Any]:
    req = urllib.request.Request(url + "/v1/info", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_workers_in_separate_namespaces_train_and_sync(
    network: Network, tmp_path: Path, engine: str
) -> None:
    token = secrets.token_hex(16)
    run_args = [f"rollout.engine={engine}", *RUN_ARGS]
    logs = tmp_path / "worker-logs"
    logs.mkdir()
    workers = [start_worker(network, role, run_args, token, logs) for role in ROLES]
    try:
        wait_ready(workers)
        # each worker runs in a network namespace of its own, none in ours
        netns = {net_namespace(w) for w in workers}
        assert len(netns) == len(ROLES) and os.readlink("/proc/self/ns/net") not in netns
        urls = {w.role: w.url for w in workers}
        cfg = load_config(
            ROOT / "configs" / "tiny-grpo.yaml",
            [
                *run_args,
                f"run.output_dir={tmp_path / 'runs'}",
                "run.name=multihost",
                "run.progress=false",
                f"run.token={json.dumps(token)}",
                *(f"{role}.urls=[{url}]" for role, url in urls.items()),
                f"sync.port={SYNC_PORT}",
                "sync.timeout_s=120",
            ],
        )
        try:
            summary = uvloop.run(Controller(cfg).run())
        except BaseException:
            for w in workers:
                print(f"--- {w.role} worker log ---\n{w.log_tail()}", file=sys.stderr)
            raise
        infos = {role: get_info(url, token) for role, url in urls.items()}
    finally:
        stop_workers(workers)

    run_dir = cfg.run_dir
    assert summary["steps"] == STEPS
    samples = jsonl(run_dir / "samples.jsonl")
    assert len(samples) == STEPS * cfg.rows_per_step == STEPS * 64
    steps = [x for x in jsonl(run_dir / "metrics.jsonl") if "event" not in x]
    assert [s["version"] for s in steps] == [1, 2, 3]
    # the rollout worker, in its own namespace, received every update over the sync group
    assert infos["rollout"]["policy_version"] == STEPS
    assert {role: info["role"] for role, info in infos.items()} == {r: r for r in ROLES}
    assert (run_dir / "checkpoints").is_dir()
