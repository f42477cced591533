"""Bad input against a real worker process: every refusal is a JSON 4xx, counted, harmless.

One ``storage`` worker is started with a small ``--max-body`` and seeded with a few rows. Each
case sends one bad request and checks the status, that the answer is ``{"error": ...}`` naming
the problem, that exactly one refusal of the expected kind was counted on ``/v1/info``, and that
the unit's stats did not move. Nothing received is ever unpickled.

The ops of the ``actor``, ``rollout`` and ``reward`` roles (tiny model, CPU, started only for
their cases) get malformed ``params`` and batches the same way: refused with a 4xx naming the
parameter, counted, and the role's state (policy version, requests) unchanged.
"""

from __future__ import annotations

import ast
import http.client
import json
import os
import pickle
import secrets
import select
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncflow.transfer.framing import decode, encode_bytes
from asyncflow.transfer.service import MAX_IDS

TOKEN = secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 4 << 20  # room for MAX_IDS + 1 ids in JSON, small enough to overflow cheaply
ROOT = Path(__file__).parents[2]


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        chunked: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            if chunked:
                assert body is not None
                chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
                conn.request(method, path, chunks, headers or {}, encode_chunked=True)
            else:
                conn.request(method, path, body, headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        status, _, out = self.request(method, path, data, AUTH)
        assert status == 200, (path, status, out[:300])
        return json.loads(out)

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = self.json("GET", "/v1/info")["counters"]
        return out

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self.json("GET", "/v1/storage/stats")
        return out

    def state(self) -> dict[str, Any]:
        """What the role reports on ``/v1/info`` (policy version, requests, ...), less clocks
        and counters."""
        info = self.json("GET", "/v1/info")
        return {k: v for k, v in info.items() if k not in VOLATILE_INFO}


VOLATILE_INFO = {"counters", "uptime_s", "busy_s", "compute_s"}


def start_worker(
    log: Path, max_body: int, role: str = "storage", settings: dict[str, Any] | None = None
) -> Worker:
    """``python -m asyncflow.workers --role ROLE`` with ``--max-body`` (spawn_worker has no
    such option), waiting for its ready line. It runs in the log's folder: a relative path that
    a request slips through lands there, not in the checkout."""
    env = {**os.environ, "ASYNCFLOW_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "asyncflow.workers", "--role", role, "--name", f"bad-{role}"]
    cmd += ["--max-body", str(max_body), "--settings", json.dumps(settings or {})]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=log.parent)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else b""
    if not line:
        proc.kill()
        raise RuntimeError(f"worker did not start: {log.read_text()[-2000:]}")
    url = json.loads(line)["url"].removeprefix("http://")
    host, port = url.rsplit(":", 1)
    return Worker(proc, host, int(port), log)


def stop_worker(w: Worker) -> int:
    try:
        w.request("POST", "/v1/shutdown", b"{}", AUTH)
        return w.proc.wait(timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        w.proc.kill()
        return w.proc.wait()


SEED_X = torch.arange(12, dtype=torch.float32).reshape(4, 3)
SEED_IDS = [torch.arange(n, dtype=torch.int64) for n in (2, 5, 1, 3)]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(tmp_path_factory.mktemp("worker") / "worker.log", MAX_BODY)
    try:
        seed = {
            "x": SEED_X,
            "ids.values": torch.cat(SEED_IDS),
            "ids.lengths": torch.tensor([len(t) for t in SEED_IDS]),
        }
        status, _, out = w.request(
            "POST", "/v1/storage/put", encode_bytes(seed, {"rows": [0, 1, 2, 3]}), AUTH
        )
        assert status == 200, out
        yield w
    finally:
        code = stop_worker(w)
    assert code == 0, w.log.read_text()[-2000:]


#: the tiny model on CPU, one thread: these workers only have to refuse
ROLE_SETTINGS: dict[str, dict[str, Any]] = {
    "actor": {"threads": 1},
    "rollout": {
        "engine": "transformers",
        "data": {"train_size": 8},
        "eval": {"size": 4},
        "sampling": {"max_new_tokens": 2},
    },
    "reward": {"data": {"train_size": 8}},
}


def role_worker(tmp_path_factory: pytest.TempPathFactory, role: str) -> Iterator[Worker]:
    log = tmp_path_factory.mktemp(role) / "worker.log"
    w = start_worker(log, MAX_BODY, role, ROLE_SETTINGS[role])
    try:
        yield w
    finally:
        code = stop_worker(w)
    assert code == 0, w.log.read_text()[-2000:]


@pytest.fixture(scope="module")
def actor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from role_worker(tmp_path_factory, "actor")


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from role_worker(tmp_path_factory, "rollout")


@pytest.fixture(scope="module")
def reward(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from role_worker(tmp_path_factory, "reward")


def frame(header: Any, data: bytes = b"", *, hlen: int | None = None) -> bytes:
    """A frame built by hand, so that its header can say anything."""
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(h) if hlen is None else hlen) + h + data


def t_entry(dtype: str, shape: Any, start: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def meta(rows: Any) -> dict[str, str]:
    return {"rows": json.dumps(rows)}


GOOD_PUT = encode_bytes({"y": torch.ones(2, 3)}, {"rows": [10, 11]})


class _Boom:
    """Unpickling this creates the marker file: the proof that something was unpickled."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def pickle_payload(marker: Path) -> bytes:
    b = _Boom()
    b.marker = str(marker)
    return pickle.dumps({"columns": {"x": [0]}, "rows": [0], "boom": b})


@dataclass
class Case:
    id: str
    method: str
    path: str
    body: bytes | None
    status: int
    message: str  # must appear in the {"error": ...} text
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    worker: str = "worker"  # the fixture of the worker it goes to


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


VALID_BATCH = {
    "task": "t",
    "rows": [0, 1],
    "groups": [0, 0],
    "meta": [{}, {}],
    "fields": {"x": [["u", [3], "float32", 0], ["u", [3], "float32", 0]]},
}


def batch(**change: Any) -> bytes:
    return js({"batch": {**VALID_BATCH, **change}})


def ragged(values: torch.Tensor, lengths: torch.Tensor, rows: list[int]) -> bytes:
    return encode_bytes({"r.values": values, "r.lengths": lengths}, {"rows": rows})


STEP = {"step": 0, "attempt": 0, "global_tokens": 8, "global_sequences": 2}
#: a batch the rollout could generate for (dataset rows 0 and 1), if its params were right
GEN_BATCH = {**VALID_BATCH, "meta": [{"index": 0}, {"index": 1}], "fields": {}}
EMPTY_BATCH = {"task": "t", "rows": [], "groups": [], "meta": [], "fields": {}}
#: sync_init params that would reach for a rendezvous (within a second) if they were accepted
SYNC = {"host": "127.0.0.1", "port": 9, "world_size": 2, "timeout_s": 1}


def op(case_id: str, status: int, message: str, **body: Any) -> Case:
    """A case for a role's op, ``case_id`` being ``ROLE-OP-what``: ``POST /v1/work/OP`` with
    ``body`` to the ROLE worker."""
    role, name, _ = case_id.split("-", 2)
    return Case(case_id, "POST", f"/v1/work/{name}", js(body), status, message, worker=role)


CASES = [
    # ---- JSON endpoints: malformed bodies
    Case("get-not-json", "POST", "/v1/storage/get", b"{not json", 400, "body is not JSON"),
    Case("get-not-utf8", "POST", "/v1/storage/get", b'{"columns": "\xff"}', 400, "not JSON"),
    Case("get-deep-nesting", "POST", "/v1/storage/get", b"[" * 100_000, 400, "not JSON"),
    Case("get-5000-digit-int", "POST", "/v1/storage/get",
         b'{"columns": {"x": [' + b"1" * 5000 + b"]}}", 400, "not JSON"),
    Case("get-empty-body", "POST", "/v1/storage/get", b"", 400, "not JSON"),
    Case("get-json-list", "POST", "/v1/storage/get", b"[1, 2]", 400, "must be a JSON object"),
    Case("get-json-string", "POST", "/v1/storage/get", b'"x"', 400, "must be a JSON object"),
    Case("get-columns-list", "POST", "/v1/storage/get", js({"columns": ["x"]}), 400,
         '"columns" must be an object'),
    Case("get-columns-empty", "POST", "/v1/storage/get", js({"columns": {}}), 400, '"columns"'),
    Case("get-ids-not-list", "POST", "/v1/storage/get", js({"columns": {"x": 0}}), 400,
         "must be a list of integers"),
    Case("get-negative-id", "POST", "/v1/storage/get", js({"columns": {"x": [-1]}}), 400,
         "got -1"),
    Case("get-float-id", "POST", "/v1/storage/get", js({"columns": {"x": [0.5]}}), 400,
         "got 0.5"),
    Case("get-integral-float-id", "POST", "/v1/storage/get", js({"columns": {"x": [1.0]}}), 400,
         "got 1.0"),
    Case("get-string-id", "POST", "/v1/storage/get", js({"columns": {"x": ["0"]}}), 400,
         "got '0'"),
    Case("get-bool-id", "POST", "/v1/storage/get", js({"columns": {"x": [True]}}), 400,
         "got True"),
    Case("get-null-id", "POST", "/v1/storage/get", js({"columns": {"x": [None]}}), 400,
         "got None"),
    Case("get-id-2**63", "POST", "/v1/storage/get", js({"columns": {"x": [2**63]}}), 400,
         "[0, 2**63)"),
    Case("get-huge-id", "POST", "/v1/storage/get", js({"columns": {"x": [10**300]}}), 400,
         "[0, 2**63)"),
    Case("get-too-many-ids", "POST", "/v1/storage/get",
         js({"columns": {"x": [0] * (MAX_IDS + 1)}}), 400, f"at most {MAX_IDS} ids"),
    Case("get-unknown-rows", "POST", "/v1/storage/get", js({"columns": {"x": [0, 99]}}), 404,
         "1 rows not held here, e.g. [99]"),
    Case("get-unknown-column", "POST", "/v1/storage/get", js({"columns": {"nope": [0]}}), 404,
         "column 'nope'"),
    Case("get-oversized", "POST", "/v1/storage/get", b" " * (MAX_BODY + 1), 413, "too large"),
    Case("get-oversized-chunked", "POST", "/v1/storage/get", b" " * (MAX_BODY + 1), 413,
         "too large", chunked=True),
    Case("get-gzip", "POST", "/v1/storage/get", b"\x1f\x8b garbage", 415,
         "Content-Encoding 'gzip' is not accepted", {"Content-Encoding": "gzip"}),
    Case("free-rows-string", "POST", "/v1/storage/free", js({"rows": "all"}), 400,
         "rows must be a list"),
    Case("free-no-rows", "POST", "/v1/storage/free", js({}), 400, "rows must be a list"),
    Case("free-negative", "POST", "/v1/storage/free", js({"rows": [0, -3]}), 400, "got -3"),
    Case("free-columns-string", "POST", "/v1/storage/free", js({"rows": [0], "columns": "x"}),
         400, "columns must be a list of non-empty strings"),
    Case("free-columns-empty-name", "POST", "/v1/storage/free",
         js({"rows": [0], "columns": [""]}), 400, "non-empty strings"),
    Case("free-not-json", "POST", "/v1/storage/free", b"rows=0", 400, "not JSON"),
    # ---- put: frames that are cut short or whose header lies
    Case("put-3-bytes", "POST", "/v1/storage/put", b"\x00" * 3, 400, "shorter than its 8-byte"),
    Case("put-empty", "POST", "/v1/storage/put", b"", 400, "shorter than its 8-byte"),
    Case("put-truncated-data", "POST", "/v1/storage/put", GOOD_PUT[:-5], 400,
         "bad shape/offsets for 'y'"),
    Case("put-truncated-header", "POST", "/v1/storage/put", GOOD_PUT[:20], 400,
         "does not fit a frame"),
    Case("put-header-length-huge", "POST", "/v1/storage/put", frame({}, hlen=2**63), 400,
         "header length"),
    Case("put-header-not-json", "POST", "/v1/storage/put", frame(b"{nope"), 400,
         "header is not JSON"),
    Case("put-header-not-utf8", "POST", "/v1/storage/put", frame(b'{"\xff": 1}'), 400,
         "header is not JSON"),
    Case("put-header-list", "POST", "/v1/storage/put", frame([1, 2]), 400,
         "header is not a JSON object"),
    Case("put-unknown-dtype", "POST", "/v1/storage/put",
         frame({"__metadata__": meta([0]), "y": t_entry("F128", [1], 0, 16)}, b"\0" * 16),
         400, "bad header entry for 'y'"),
    Case("put-entry-not-object", "POST", "/v1/storage/put",
         frame({"__metadata__": meta([0]), "y": "F32"}), 400, "bad header entry for 'y'"),
    Case("put-shape-lies", "POST", "/v1/storage/put",
         frame({"__metadata__": meta([0]), "y": t_entry("F32", [1, 3], 0, 8)}, b"\0" * 8),
         400, "needs 12 bytes, offsets give 8"),
    Case("put-negative-shape", "POST", "/v1/storage/put",
         frame({"__metadata__": meta([0]), "y": t_entry("F32", [-1], 0, 4)}, b"\0" * 4),
         400, "bad shape/offsets"),
    Case("put-offsets-past-end", "POST", "/v1/storage/put",
         frame({"__metadata__": meta([0]), "y": t_entry("F32", [1], 4, 8)}, b"\0" * 4),
         400, "bad shape/offsets"),
    Case("put-offsets-reversed", "POST", "/v1/storage/put",
         frame({"__metadata__": meta([0]), "y": t_entry("F32", [1], 4, 0)}, b"\0" * 4),
         400, "bad shape/offsets"),
    Case("put-offset-infinite", "POST", "/v1/storage/put",
         frame(b'{"y": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}', b"\0" * 4),
         400, "malformed frame"),
    Case("put-metadata-not-object", "POST", "/v1/storage/put",
         frame({"__metadata__": [1], "y": t_entry("F32", [1], 0, 4)}, b"\0" * 4),
         400, "bad __metadata__"),
    Case("put-metadata-not-json", "POST", "/v1/storage/put",
         frame({"__metadata__": {"rows": "[0"}, "y": t_entry("F32", [1], 0, 4)}, b"\0" * 4),
         400, "bad __metadata__"),
    Case("put-metadata-deep", "POST", "/v1/storage/put",
         frame({"__metadata__": {"rows": "[" * 100_000}, "y": t_entry("F32", [1], 0, 4)},
               b"\0" * 4), 400, "malformed frame"),
    Case("put-no-rows", "POST", "/v1/storage/put", encode_bytes({"y": torch.ones(2)}), 400,
         "__metadata__.rows must be a list"),
    Case("put-rows-negative", "POST", "/v1/storage/put",
         encode_bytes({"y": torch.ones(2)}, {"rows": [1, -1]}), 400, "got -1"),
    Case("put-rows-float", "POST", "/v1/storage/put",
         encode_bytes({"y": torch.ones(2)}, {"rows": [1, 2.5]}), 400, "got 2.5"),
    Case("put-rows-huge", "POST", "/v1/storage/put",
         encode_bytes({"y": torch.ones(1)}, {"rows": [2**64]}), 400, "[0, 2**63)"),
    Case("put-rows-duplicate", "POST", "/v1/storage/put",
         encode_bytes({"y": torch.ones(2)}, {"rows": [7, 7]}), 400, "duplicate row ids"),
    Case("put-rows-count-mismatch", "POST", "/v1/storage/put",
         encode_bytes({"y": torch.ones(2, 3)}, {"rows": [5]}), 400,
         "'y' has 2 rows, metadata names 1"),
    Case("put-second-column-bad", "POST", "/v1/storage/put",
         encode_bytes({"y": torch.ones(2), "z": torch.ones(3)}, {"rows": [5, 6]}), 400,
         "'z' has 3 rows, metadata names 2"),
    Case("put-scalar-column", "POST", "/v1/storage/put",
         encode_bytes({"y": torch.tensor(1.0)}, {"rows": [5]}), 400, "leading row dimension"),
    Case("put-oversized", "POST", "/v1/storage/put", b"\0" * (MAX_BODY + 1), 413,
         f"exceeds {MAX_BODY}"),
    Case("put-oversized-chunked", "POST", "/v1/storage/put", b"\0" * (MAX_BODY + 1), 413,
         "too large", chunked=True),
    Case("put-gzip", "POST", "/v1/storage/put", GOOD_PUT, 415, "not accepted",
         {"Content-Encoding": "gzip"}),
    # ---- put: ragged columns whose lengths do not add up
    Case("ragged-no-lengths", "POST", "/v1/storage/put",
         encode_bytes({"r.values": torch.ones(3)}, {"rows": [5]}), 400,
         "1-d integer .lengths"),
    Case("ragged-float-lengths", "POST", "/v1/storage/put",
         ragged(torch.ones(3), torch.tensor([1.5, 1.5]), [5, 6]), 400, "1-d integer .lengths"),
    Case("ragged-2d-lengths", "POST", "/v1/storage/put",
         ragged(torch.ones(3), torch.tensor([[1, 2]]), [5, 6]), 400, "1-d integer .lengths"),
    Case("ragged-sum-mismatch", "POST", "/v1/storage/put",
         ragged(torch.ones(3), torch.tensor([1, 1]), [5, 6]), 400,
         ".lengths sum to 2, .values has 3 rows"),
    Case("ragged-negative-length", "POST", "/v1/storage/put",
         ragged(torch.ones(3), torch.tensor([4, -1]), [5, 6]), 400, "negative lengths"),
    Case("ragged-row-count", "POST", "/v1/storage/put",
         ragged(torch.ones(3), torch.tensor([1, 1, 1]), [5, 6]), 400,
         "'r' has 3 rows, metadata names 2"),
    Case("ragged-scalar-values", "POST", "/v1/storage/put",
         ragged(torch.tensor(1.0), torch.tensor([1]), [5]), 400, "leading row dimension"),
    Case("ragged-orphan-lengths", "POST", "/v1/storage/put",
         encode_bytes({"r.lengths": torch.tensor([1])}, {"rows": [5]}), 400,
         "'r.lengths' without its .values"),
    Case("ragged-and-plain", "POST", "/v1/storage/put",
         encode_bytes({"r": torch.ones(1), "r.values": torch.ones(1),
                       "r.lengths": torch.tensor([1])}, {"rows": [5]}), 400, "given twice"),
    Case("empty-column-name", "POST", "/v1/storage/put",
         encode_bytes({".values": torch.ones(1), ".lengths": torch.tensor([1])}, {"rows": [5]}),
         400, "non-empty name"),
    # ---- work: body checked before the op lookup, so malformed is 400 whatever the op
    Case("work-unknown-op", "POST", "/v1/work/unknown", js({}), 404, "has no op 'unknown'"),
    Case("work-unknown-op-valid-batch", "POST", "/v1/work/unknown", batch(), 404, "has no op"),
    Case("work-not-json", "POST", "/v1/work/unknown", b"{", 400, "not JSON"),
    Case("work-batch-list", "POST", "/v1/work/unknown", js({"batch": [1]}), 400,
         '"batch" must be an object'),
    Case("work-batch-missing", "POST", "/v1/work/unknown", js({"batch": {"task": "t"}}), 400,
         "missing ['rows', 'groups', 'meta', 'fields']"),
    Case("work-batch-task", "POST", "/v1/work/unknown", batch(task=3), 400, "task must be"),
    Case("work-batch-negative-row", "POST", "/v1/work/unknown", batch(rows=[0, -1]), 400,
         "got -1"),
    Case("work-batch-string-rows", "POST", "/v1/work/unknown", batch(rows="01"), 400,
         "batch.rows must be a list"),
    Case("work-batch-float-row", "POST", "/v1/work/unknown", batch(rows=[0, 1.5]), 400,
         "got 1.5"),
    Case("work-batch-huge-row", "POST", "/v1/work/unknown", batch(rows=[0, 2**70]), 400,
         "[0, 2**63)"),
    Case("work-batch-groups-short", "POST", "/v1/work/unknown", batch(groups=[0]), 400,
         "groups needs one entry per row"),
    Case("work-batch-groups-negative", "POST", "/v1/work/unknown", batch(groups=[0, -2]), 400,
         "groups must be"),
    Case("work-batch-meta-strings", "POST", "/v1/work/unknown", batch(meta=["a", "b"]), 400,
         "meta must be a list of objects"),
    Case("work-batch-fields-list", "POST", "/v1/work/unknown", batch(fields=[1]), 400,
         "fields must be an object"),
    Case("work-batch-field-short", "POST", "/v1/work/unknown",
         batch(fields={"x": [["u", [3], "float32", 0]]}), 400, "x needs one entry per row"),
    Case("work-batch-field-entry", "POST", "/v1/work/unknown",
         batch(fields={"x": [["u", [3]], ["u", [3]]]}), 400, "[unit, shape, dtype, version]"),
    Case("work-batch-field-shape", "POST", "/v1/work/unknown",
         batch(fields={"x": [["u", 3, "f", 0], ["u", [-3], "f", 0]]}), 400,
         "shapes are lists of sizes"),
    Case("work-batch-field-version", "POST", "/v1/work/unknown",
         batch(fields={"x": [["u", [3], "f", "0"], ["u", [3], "f", 0]]}), 400,
         "version an integer"),
    Case("work-units-not-urls", "POST", "/v1/work/unknown", js({"units": {"u": "file:///x"}}),
         400, "must map to an http URL"),
    Case("work-units-list", "POST", "/v1/work/unknown", js({"units": ["http://a:1"]}), 400,
         '"units" must map'),
    Case("work-params-list", "POST", "/v1/work/unknown", js({"params": [1]}), 400,
         '"params" must be an object'),
    Case("work-oversized", "POST", "/v1/work/unknown", b" " * (MAX_BODY + 1), 413, "too large"),
    # ---- work: the roles' ops check their params and batch first ("role-op-what" ids)
    op("actor-finish-step-string", 400, "params.step must be an integer >= 0, got 'abc'",
       params={**STEP, "step": "abc"}),
    op("actor-finish-step-bool", 400, "params.step must be an integer >= 0, got True",
       params={**STEP, "step": True}),
    op("actor-finish-no-params", 400, "params.step is required", params={}),
    op("actor-finish-negative-attempt", 400, "params.attempt must be an integer >= 0, got -1",
       params={**STEP, "attempt": -1}),
    op("actor-finish-zero-tokens", 400,
       "params.global_tokens must be a finite number > 0, got 0",
       params={**STEP, "global_tokens": 0}),
    op("actor-finish-string-sequences", 400,
       "params.global_sequences must be an integer >= 1, got '2'",
       params={**STEP, "global_sequences": "2"}),
    op("actor-train_micro-float-step", 400, "params.step must be an integer >= 0, got 1.5",
       params={**STEP, "step": 1.5}, batch=VALID_BATCH),
    op("actor-train_micro-no-batch", 400, "train_micro needs a batch", params=STEP),
    op("actor-train_micro-empty-batch", 400, "train_micro needs a batch of at least one row",
       params=STEP, batch=EMPTY_BATCH),
    op("actor-train_micro-missing-column", 400, "the batch has no column 'prompt_ids'",
       params=STEP, batch=VALID_BATCH),
    op("actor-train_micro-columns-string", 400,
       "params.columns must be a list of non-empty strings",
       params={**STEP, "columns": "advantages"}, batch=VALID_BATCH),
    op("actor-save-no-path", 400, "params.path is required (a non-empty string)", params={}),
    op("actor-save-empty-path", 400, "params.path must be a non-empty string, got ''",
       params={"path": ""}),
    op("actor-load-path-list", 400, "params.path must be a non-empty string, got [1]",
       params={"path": [1]}),
    op("actor-load-no-folder", 404, "params.path: no checkpoint folder at '/nonexistent/ckpt'",
       params={"path": "/nonexistent/ckpt"}),
    op("actor-sync_init-port-string", 400,
       "params.port must be an integer in [1, 65535], got 'x'", params={**SYNC, "port": "x"}),
    op("actor-sync_init-no-host", 400, "params.host is required", params={"port": 9}),
    op("actor-sync_init-backend", 400,
       "params.backend must be one of ['gloo', 'nccl'], got 'mpi'",
       params={**SYNC, "backend": "mpi"}),
    op("actor-sync_init-negative-timeout", 400,
       "params.timeout_s must be a finite number > 0, got -1", params={**SYNC, "timeout_s": -1}),
    op("actor-sync_send-before-init", 400, "sync_send before sync_init"),
    op("rollout-generate-no-batch", 400, "generate needs a batch"),
    op("rollout-generate-empty-batch", 400, "generate needs a batch of at least one row",
       batch=EMPTY_BATCH),
    op("rollout-generate-seed-string", 400, "params.seed must be an integer, got 'abc'",
       params={"seed": "abc"}, batch=GEN_BATCH),
    op("rollout-generate-step-string", 400, "batch.meta step must be an integer, got 'x'",
       batch={**GEN_BATCH, "meta": [{"index": 0, "step": "x"}, {"index": 1}]}),
    op("rollout-generate-sampling-list", 400, "params.sampling must be an object, got [1]",
       params={"sampling": [1]}, batch=GEN_BATCH),
    op("rollout-generate-negative-temperature", 400,
       "params.sampling.temperature must be a finite number >= 0, got -1",
       params={"sampling": {"temperature": -1}}, batch=GEN_BATCH),
    op("rollout-generate-zero-tokens", 400,
       "params.sampling.max_new_tokens must be an integer >= 1, got 0",
       params={"sampling": {"max_new_tokens": 0}}, batch=GEN_BATCH),
    op("rollout-generate-top-p", 400, "params.sampling.top_p must be a finite number > 0",
       params={"sampling": {"top_p": 2}}, batch=GEN_BATCH),
    op("rollout-generate-unknown-index", 404, "dataset index 99",
       batch={**GEN_BATCH, "meta": [{"index": 0}, {"index": 99}]}),
    op("rollout-evaluate-negative-index", 400,
       "params.indices must be integers in [0, 2**63), got -1", params={"indices": [-1]}),
    op("rollout-evaluate-string-index", 400,
       "params.indices must be integers in [0, 2**63), got '0'", params={"indices": ["0"]}),
    op("rollout-evaluate-indices-int", 400, "params.indices must be a list of integers",
       params={"indices": 0}),
    op("rollout-evaluate-no-indices", 400, "params.indices must name at least one eval row",
       params={"indices": []}),
    op("rollout-evaluate-index-past-end", 404,
       "params.indices names eval row 4; the eval set", params={"indices": [0, 4]}),
    op("rollout-evaluate-unknown-builtin", 400,
       "params.reward: unknown built-in reward 'builtin:nope'",
       params={"indices": [0], "reward": "builtin:nope"}),
    op("rollout-evaluate-unknown-module", 400,
       "params.reward: reward function 'no_such_mod_xyz:f'",
       params={"indices": [0], "reward": "no_such_mod_xyz:f"}),
    op("rollout-evaluate-zero-timeout", 400,
       "params.timeout_s must be a finite number > 0, got 0",
       params={"indices": [0], "timeout_s": 0}),
    op("rollout-evaluate-top-k-string", 400, "params.sampling.top_k must be an integer, got 'x'",
       params={"indices": [0], "sampling": {"top_k": "x"}}),
    op("rollout-sync_init-rank-too-big", 400, "params.rank must be an integer in [1, 1], got 2",
       params={**SYNC, "rank": 2}),
    op("rollout-sync_init-world-of-one", 400,
       "params.world_size must be an integer >= 2, got 1",
       params={**SYNC, "world_size": 1, "rank": 1}),
    op("rollout-sync_recv-before-init", 400, "sync_recv before sync_init"),
    op("reward-score-no-batch", 400, "score needs a batch"),
    op("reward-score_groups-empty-batch", 400, "score needs a batch of at least one row",
       batch=EMPTY_BATCH),
    op("reward-score-missing-column", 400, "the batch has no column 'response_ids'",
       batch=VALID_BATCH),
    op("reward-advantages-no-batch", 400, "advantages needs a batch"),
    # ---- routes and methods
    Case("unknown-path", "GET", "/v1/nope", None, 404, "Not Found"),
    Case("unknown-path-post", "POST", "/v1/storage/nope", b"{}", 404, "Not Found"),
    Case("get-on-put", "GET", "/v1/storage/put", None, 405, "Method Not Allowed"),
    Case("post-on-info", "POST", "/v1/info", b"{}", 405, "Method Not Allowed"),
    Case("delete-on-stats", "DELETE", "/v1/storage/stats", None, 405, "Method Not Allowed"),
]  # fmt: skip

KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
KINDS[415] = "unsupported_encoding"


def check_refusal(w: Worker, case: Case, headers: dict[str, str], kind: str) -> dict[str, Any]:
    before_stats, before_state, before = w.stats(), w.state(), w.counters()
    status, resp_headers, body = w.request(
        case.method, case.path, case.body, headers, chunked=case.chunked
    )
    assert status == case.status, (case.id, status, body[:300])
    assert resp_headers.get("Content-Type", "").startswith("application/json"), resp_headers
    answer = json.loads(body)
    assert set(answer) == {"error"}, answer
    assert case.message in answer["error"], (case.id, answer)
    after = w.counters()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()}
    assert {k: v for k, v in delta.items() if v} == {kind: 1}, (case.id, before, after)
    assert w.stats() == before_stats, case.id
    assert w.state() == before_state, case.id
    return answer


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_refused_counted_and_changes_nothing(
    request: pytest.FixtureRequest, case: Case
) -> None:
    w: Worker = request.getfixturevalue(case.worker)
    check_refusal(w, case, {**AUTH, **case.headers}, KINDS[case.status])


ENDPOINTS = [
    ("GET", "/v1/info", None),
    ("GET", "/v1/storage/stats", None),
    ("POST", "/v1/storage/get", js({"columns": {"x": [0]}})),
    ("POST", "/v1/storage/put", GOOD_PUT),  # would store rows 10, 11
    ("POST", "/v1/storage/free", js({"rows": [0, 1, 2, 3]})),  # would free the seed
    ("POST", "/v1/work/unknown", js({})),
    ("POST", "/v1/shutdown", b"{}"),  # would stop the worker
    ("GET", "/v1/nope", None),  # unknown paths are 401 too: nothing is learnt without a token
]
BAD_AUTH = {
    "none": {},
    "empty": {"Authorization": ""},
    "wrong-token": {"Authorization": "Bearer " + "0" * len(TOKEN)},
    "token-prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "token-longer": {"Authorization": f"Bearer {TOKEN}0"},
    "basic-scheme": {"Authorization": f"Basic {TOKEN}"},
    "no-scheme": {"Authorization": TOKEN},
    "lowercase-scheme": {"Authorization": f"bearer {TOKEN}"},
    "two-spaces": {"Authorization": f"Bearer  {TOKEN}"},
    "latin-1": {"Authorization": "Bearer t\u00f6k\u00e9n"},
    "token-elsewhere": {"X-Token": TOKEN, "Cookie": f"token={TOKEN}"},
}


@pytest.mark.parametrize("auth", BAD_AUTH.values(), ids=list(BAD_AUTH))
@pytest.mark.parametrize(
    ("method", "path", "body"), ENDPOINTS, ids=[f"{m}{p}" for m, p, _ in ENDPOINTS]
)
def test_missing_or_wrong_token_is_401_everywhere(
    worker: Worker, method: str, path: str, body: bytes | None, auth: dict[str, str]
) -> None:
    case = Case("auth", method, path, body, 401, "missing or wrong run token")
    check_refusal(worker, case, auth, "unauthorized")
    status, _, out = worker.request("GET", "/healthz")
    assert status == 200 and json.loads(out)["ok"] is True


def healthz_says_nothing_else(answer: dict[str, object]) -> bool:
    """``{"ok": true, "instance": ID}``: the id is random per process (heartbeats tell a
    restarted worker by it), nothing of the run or the host."""
    instance = answer.get("instance")
    return (
        set(answer) == {"ok", "instance"}
        and answer["ok"] is True
        and isinstance(instance, str)
        and len(instance) == 16
        and all(c in "0123456789abcdef" for c in instance)
    )


def test_healthz_needs_no_token_but_says_nothing_else(worker: Worker) -> None:
    status, _, out = worker.request("GET", "/healthz")
    assert status == 200 and healthz_says_nothing_else(json.loads(out))
    assert json.loads(worker.request("GET", "/healthz")[2]) == json.loads(out)  # stable


def test_pickle_payloads_are_refused_and_never_unpickled(worker: Worker, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle_payload(marker)
    for path in ("/v1/storage/get", "/v1/storage/free", "/v1/storage/put", "/v1/work/unknown"):
        for ctype in ("application/octet-stream", "application/python-pickle"):
            case = Case("pickle", "POST", path, payload, 400, "")
            answer = check_refusal(worker, case, {**AUTH, "Content-Type": ctype}, "bad_request")
            assert "JSON" in answer["error"] or "frame" in answer["error"], answer
    assert not marker.exists()


PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve"}
PICKLE_MODULES |= {"joblib", "copyreg"}


def test_no_module_of_asyncflow_can_unpickle() -> None:
    """Static check: nothing in the package imports a pickle module or calls ``torch.load``
    (which unpickles) or ``numpy.load`` with ``allow_pickle``."""
    offenders = []
    files = sorted((ROOT / "asyncflow").rglob("*.py"))
    assert len(files) > 20
    for py in files:
        tree = ast.parse(py.read_text(encoding="utf-8"), str(py))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            if PICKLE_MODULES & set(names):
                offenders.append(f"{py}:{getattr(node, 'lineno', 0)}: imports {names}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                base = owner.id if isinstance(owner, ast.Name) else ""
                if base == "torch" and node.func.attr == "load":
                    offenders.append(f"{py}:{node.lineno}: torch.load")
                if node.func.attr == "load" and any(k.arg == "allow_pickle" for k in node.keywords):
                    offenders.append(f"{py}:{node.lineno}: load(allow_pickle=...)")
    assert offenders == []


def test_odd_but_harmless_headers_do_not_break_valid_requests(worker: Worker) -> None:
    """A bogus charset or content type is ignored (bodies are UTF-8 JSON or frames), not a 500."""
    before = worker.counters()
    for ctype in ("application/json; charset=bogus", "text/plain", "application/x-whatever"):
        headers = {**AUTH, "Content-Type": ctype, "Content-Encoding": "identity"}
        status, _, out = worker.request(
            "POST", "/v1/storage/get", js({"columns": {"x": [2, 0]}}), headers
        )
        assert status == 200, out
        tensors, _ = decode(out)
        assert torch.equal(tensors["x"], SEED_X[[2, 0]])
    assert worker.counters() == before


def test_worker_still_serves_the_seed_after_every_refusal(worker: Worker) -> None:
    """Runs last in this module: the seed rows are intact, no request caused a 500, and the
    refusals above were counted by kind."""
    status, _, out = worker.request(
        "POST", "/v1/storage/get", js({"columns": {"x": [3, 1], "ids": [1, 3]}}), AUTH
    )
    assert status == 200, out
    tensors, _ = decode(out)
    assert torch.equal(tensors["x"], SEED_X[[3, 1]])
    assert tensors["ids.lengths"].tolist() == [5, 3]
    assert torch.equal(tensors["ids.values"], torch.cat([SEED_IDS[1], SEED_IDS[3]]))
    assert worker.stats()["columns"] == {"x": 4, "ids": 4}
    counters = worker.counters()
    assert counters.get("errors", 0) == 0, worker.log.read_text()[-3000:]
    assert set(counters) <= {*KINDS.values(), "unauthorized"}, counters
    assert worker.proc.poll() is None


def test_roles_still_work_after_every_refusal(actor: Worker, rollout: Worker) -> None:
    """Runs after the cases: no refusal was a 500, and the roles still answer good requests."""
    out = rollout.json("POST", "/v1/work/evaluate", {"params": {"indices": [0, 3]}})
    assert out["metrics"]["n"] == 2
    assert actor.state()["policy_version"] == 0
    for w in (actor, rollout):
        counters = w.counters()
        assert counters.get("errors", 0) == 0, w.log.read_text()[-3000:]
        assert set(counters) <= {*KINDS.values(), "unauthorized"}, counters
