"""Random requests against a running storage worker: never a 5xx, never a crash, and the unit's
state moves only for a valid, authorized put or free."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import select
import struct
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from asyncflow.transfer.framing import CODES, encode_bytes

TOKEN = secrets.token_hex(8)
MAX_BODY = 1 << 20
ROOT = Path(__file__).parents[2]
PATHS = [
    "/healthz",
    "/v1/info",
    "/v1/storage/get",
    "/v1/storage/put",
    "/v1/storage/free",
    "/v1/storage/stats",
    "/v1/work/generate",
    "/v1/work/",
    "/v1/shutdown",
]
MUTATING = {"/v1/storage/put", "/v1/storage/free"}


class Worker:
    def __init__(self, log: Path) -> None:
        env = {**os.environ, "ASYNCFLOW_TOKEN": TOKEN}
        cmd = [sys.executable, "-m", "asyncflow.workers", "--role", "storage", "--name", "fuzz"]
        cmd += ["--max-body", str(MAX_BODY)]
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.proc.kill()
            raise RuntimeError(f"worker did not start: {log.read_text()[-2000:]}")
        host, port = json.loads(line)["url"].removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)

    def request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body, headers)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type", ""), resp.read()
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        status, _, out = self.request("GET", path, None, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200, out
        return json.loads(out)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(tmp_path_factory.mktemp("fuzz") / "worker.log")
    try:
        seed = encode_bytes({"x": torch.ones(4, 2)}, {"rows": [0, 1, 2, 3]})
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert w.request("POST", "/v1/storage/put", seed, auth)[0] == 200
        yield w
    finally:
        try:
            w.request("POST", "/v1/shutdown", b"{}", {"Authorization": f"Bearer {TOKEN}"})
            w.proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            w.proc.kill()
            w.proc.wait()


ids = st.one_of(
    st.integers(min_value=-3, max_value=12),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)
shaped_json = st.one_of(
    st.fixed_dictionaries({"columns": st.dictionaries(st.sampled_from(["x", "y", ""]),
                                                      st.lists(ids, max_size=4) | ids)}),
    st.fixed_dictionaries({"rows": st.lists(ids, max_size=5) | ids},
                          optional={"columns": st.lists(st.sampled_from(["x", "y", ""]))
                                    | json_values}),
    st.fixed_dictionaries(
        {},
        optional={
            "batch": st.fixed_dictionaries(
                {"task": st.text(max_size=3) | json_values, "rows": st.lists(ids, max_size=3),
                 "groups": st.lists(ids, max_size=3), "meta": json_values,
                 "fields": st.dictionaries(st.text(max_size=2), json_values, max_size=2)}
            )
            | json_values,
            "units": st.dictionaries(st.text(max_size=3), st.text(max_size=12)) | json_values,
            "params": json_values,
        },
    ),
    json_values,
)  # fmt: skip


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A frame whose header may or may not tell the truth about its data."""
    header: dict[str, Any] = {}
    rows = draw(st.lists(ids, max_size=4) | json_values)
    if draw(st.booleans()):
        header["__metadata__"] = {"rows": json.dumps(rows)}
    elif draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    offset = 0
    for name in draw(st.lists(st.sampled_from(["x", "y", "r.values", "r.lengths", ""]),
                              max_size=3, unique=True)):  # fmt: skip
        dtype = draw(st.sampled_from([*CODES, "F128", 3]))
        shape = draw(st.lists(st.integers(min_value=-1, max_value=4), max_size=3))
        size = 1
        for s in shape:
            size *= max(s, 0)
        width = torch.empty((), dtype=CODES[dtype]).element_size() if dtype in CODES else 4
        end: Any = offset + size * width + draw(st.sampled_from([0, 0, 0, 1, -1]))
        if draw(st.integers(0, 9)) == 0:
            end = draw(st.integers() | st.floats())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        offset = end if isinstance(end, int) and 0 <= end < 4096 else offset
    data = draw(st.binary(min_size=max(offset - 2, 0), max_size=offset + 2))
    raw = json.dumps(header).encode()
    hlen = len(raw) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", hlen) + raw + data


bodies = st.one_of(
    st.none(),
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    shaped_json.map(lambda v: json.dumps(v).encode()),
    frames(),
)
auths = st.sampled_from(["valid", "valid", "valid", "none", "wrong", "scheme"])
storage_paths = st.sampled_from(["/v1/storage/get", "/v1/storage/put", "/v1/storage/free"])
paths = (
    storage_paths
    | st.sampled_from(PATHS)
    | st.text(min_size=0, max_size=20).map(lambda s: "/" + urllib.parse.quote(s, safe="/"))
)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
extra_headers = st.dictionaries(
    st.sampled_from(["Content-Type", "X-Junk", "Accept", "Content-Encoding", "Cookie"]),
    header_values | st.sampled_from(["application/json; charset=bogus", "gzip", "identity"]),
    max_size=3,
)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    method=st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "HEAD", "OPTIONS"]),
    path=paths,
    auth=auths,
    body=bodies,
    headers=st.just({}) | st.just({}) | extra_headers,
)
def test_random_requests_never_5xx_and_change_nothing_unless_valid(
    worker: Worker, method: str, path: str, auth: str, body: bytes | None, headers: dict[str, str]
) -> None:
    assume(not (auth == "valid" and path == "/v1/shutdown"))  # the one request that may stop it
    value = {
        "valid": f"Bearer {TOKEN}",
        "wrong": "Bearer " + "0" * len(TOKEN),
        "scheme": f"Basic {TOKEN}",
    }.get(auth)
    if value is not None:
        headers = {**headers, "Authorization": value}
    before = worker.get("/v1/storage/stats")
    status, ctype, out = worker.request(method, path, body, headers)
    assert status < 500, (method, path, status, out[:300], worker.log.read_text()[-2000:])
    if auth != "valid" and path != "/healthz":
        assert status == 401
    if status >= 400 and method != "HEAD":
        assert ctype.startswith("application/json") and "error" in json.loads(out), out[:200]
    after = worker.get("/v1/storage/stats")
    if not (status == 200 and path in MUTATING):
        assert after == before, (method, path, status, out[:200])
    assert worker.request("GET", "/healthz", None, {})[0] == 200


def test_fuzzed_worker_is_alive_and_never_failed(worker: Worker) -> None:
    """After the fuzzing above: still running, still healthy, no request counted as a 500."""
    assert worker.proc.poll() is None
    assert worker.request("GET", "/healthz", None, {})[0] == 200
    counters = worker.get("/v1/info")["counters"]
    assert counters.get("errors", 0) == 0, worker.log.read_text()[-3000:]
    assert counters.get("unauthorized", 0) > 0 and counters.get("bad_request", 0) > 0
