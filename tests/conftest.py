"""Shared test setup: deterministic seeds, CPU-only by default, the `gpu` marker.

Tolerances used across the suite (and why):
- fp32 parity with an independent implementation: relative error (||a - b|| / ||b||) <= 1e-5.
  Both sides do the same maths in float32 with different op orders; 1e-5 is ~100 ulps.
- bf16: the reference is the same model in float32; ours in bf16 must stay within 2x the error of
  the oracle run in bf16 against float32 (the error torch itself makes in bf16), see rel_err.
"""

import json
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in the tests


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run the suite on a GPU machine to include it)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory):
    """One tiny random FLUX.1-Fill-dev snapshot (diffusers layout) for the whole session: the
    pipeline, CLI, scaling and training tests all read it; none writes to it."""
    from tests.snapshot import write_tiny_snapshot
    return write_tiny_snapshot(tmp_path_factory.mktemp("snap") / "FLUX.1-Fill-dev")


@pytest.fixture
def stub(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "FLUX_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    from tests.helpers import Stub
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            n = len(state.requests)
            state.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            status, payload, delay = state.reply(body, n)
            if delay and state.stop.wait(delay):
                return
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client timed out and hung up
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)  # fast shutdown
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        state.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
