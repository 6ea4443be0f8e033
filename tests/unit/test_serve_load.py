"""Load and fault tests of `llavakit serve` on a tiny checkpoint (loopback only, bounded, with timeouts).

- 64 concurrent image requests all succeed and equal the single-request answers: batching (which
  really happens: the answers report batch sizes > 1) changes nothing.
- A fuzz set of bad requests: each gets a 4xx with an OpenAI error message, and /health answers 200
  after every one (the server keeps serving).
- Overload (429) and shutdown (503 for what could not finish) answer explicitly; nothing hangs.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import llavakit  # noqa: E402
from llavakit.data.images import load_image  # noqa: E402
from llavakit.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402
from tests.tiny_models import build  # noqa: E402

Q = "what is in the image ?"
N_REQUESTS = 64
MAX_NEW = 5


def png_bytes(seed: int, size: tuple[int, int] = (20, 30)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_message(text: str, *uris: str, role: str = "user") -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    return [{"role": role, "content": parts}]


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny file whose PNG header claims width x height pixels (a decompression-bomb probe)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """These tests check behaviour, not speed: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build("llava", tmp_path_factory.mktemp("serve-load-llava"))


@pytest.fixture(scope="module")
def server(model_dir):
    settings = ServeSettings(max_batch_size=8, max_wait_ms=20, max_queue=64, max_body_bytes=4_000_000,
                             request_timeout_s=60)
    with BackgroundServer(create_app(llavakit.load(str(model_dir)), settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    limits = httpx.Limits(max_connections=N_REQUESTS, max_keepalive_connections=N_REQUESTS)
    with httpx.Client(base_url=server.url, timeout=60, limits=limits) as client:
        yield client


def test_64_concurrent_image_requests_equal_single_answers(server, http, model_dir):
    images = [png_bytes(100 + i, (16 + 3 * i, 40 - 2 * i)) for i in range(8)]
    prompts = [Q, "describe the colour", "what shape is it ?", "is the circle red ?"]
    cases = [(prompts[i % len(prompts)] + " and" * (i % 3), images[i % len(images)]) for i in range(N_REQUESTS)]
    ref = llavakit.load(str(model_dir))  # a separate instance: the server's is owned by its worker
    expected = {}
    for p, d in cases:
        if (p, d) not in expected:
            msgs = [{"role": "user", "content": [{"type": "text", "text": p}, {"type": "image"}]}]
            expected[(p, d)] = ref.chat(msgs, [load_image(d)], max_new_tokens=MAX_NEW)
    barrier = threading.Barrier(N_REQUESTS, timeout=30)

    def ask(case):
        p, d = case
        barrier.wait()  # all 64 go at once
        r = http.post("/v1/chat/completions", json={"messages": image_message(p, data_uri(d)),
                                                    "max_tokens": MAX_NEW, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(N_REQUESTS) as pool:
        answers = list(pool.map(ask, cases, timeout=120))
    elapsed = time.monotonic() - t0
    got = [a["choices"][0]["message"]["content"] for a in answers]
    assert got == [expected[c] for c in cases]
    sizes = [a["llavakit"]["batch_size"] for a in answers]
    assert max(sizes) > 1, sizes
    assert all(a["usage"]["visual_tokens"] == 16 for a in answers)
    assert elapsed < 120


def _chat(**body):
    return {"json": {"messages": [{"role": "user", "content": Q}], "max_tokens": 2, **body}}


def _images(*uris: str, role: str = "user"):
    return {"json": {"messages": image_message(Q, *uris, role=role)}}


FUZZ = {
    "malformed json": {"content": b'{"messages": [', "headers": {"content-type": "application/json"}},
    "not utf-8": {"content": b"\xff\xfe\x00garbage"},
    "json array body": {"json": [1, 2, 3]},
    "empty body": {"content": b""},
    "missing messages": {"json": {"max_tokens": 3}},
    "empty messages": {"json": {"messages": []}},
    "messages is a string": {"json": {"messages": "hello"}},
    "content is a number": {"json": {"messages": [{"role": "user", "content": 42}]}},
    "unknown role": {"json": {"messages": [{"role": "wizard", "content": Q}]}},
    "unknown content part": {"json": {"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}},
    "max_tokens is a string": _chat(max_tokens="ten"),
    "negative max_tokens": _chat(max_tokens=-5),
    "zero max_tokens": _chat(max_tokens=0),
    "huge max_tokens": _chat(max_tokens=10 ** 9),
    "temperature is a string": _chat(temperature="hot"),
    "negative temperature": _chat(temperature=-1),
    "top_p zero": _chat(top_p=0),
    "stream is a string": _chat(stream="yes"),
    "seed is a float": _chat(seed=1.5),
    "five stop strings": _chat(stop=["a", "b", "c", "d", "e"]),
    "n = 2": _chat(n=2),
    "compression": _chat(compression="fastv:0.5"),
    "bad base64": _images("data:image/png;base64,%%%%not-base64%%%%"),
    "data uri without base64": _images("data:image/png,rawbytes"),
    "data uri of text/plain": _images(data_uri(b"hello", "text/plain")),
    "not an image": _images(data_uri(b"this is not a png at all")),
    "truncated png": _images(data_uri(png_bytes(0, (64, 64))[:200])),
    "20000x20000 png": _images(data_uri(huge_png_header())),
    "6000x6000 png (over max_image_pixels)": _images(data_uri(huge_png_header(6000, 6000))),
    "100 images in one message": _images(*[data_uri(png_bytes(1))] * 100),
    "image in an assistant message": _images(data_uri(png_bytes(1)), role="assistant"),
    "remote image (disabled)": _images("http://127.0.0.1:9/x.png"),
    "local path (disabled)": _images("/etc/passwd"),
    "unknown url scheme": _images("gopher://127.0.0.1/x"),
    "image tag without image": {"json": {"messages": [{"role": "user", "content": "<image> " + Q}]}},
    "prompt over the context": {"json": {"messages": [{"role": "user", "content": "what " * 600}]}},
    "prompt + max_tokens over the context": _chat(messages=[{"role": "user", "content": "what " * 400}],
                                                  max_tokens=200),
    "1 MB of text": {"json": {"messages": [{"role": "user", "content": "a" * 1_000_000}]}},
    "10 MB body": {"json": {"messages": [{"role": "user", "content": "a" * 10_000_000}]}},
}


@pytest.mark.parametrize("name", list(FUZZ))
def test_fuzz_gets_4xx_with_message_and_server_keeps_serving(name, http):
    kw = dict(FUZZ[name])
    r = http.post("/v1/chat/completions", **kw)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"]
    assert http.get("/health").status_code == 200


def test_fuzz_other_routes(http):
    assert http.get("/v1/nope").status_code == 404
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert http.get("/v1/models/not-this-one").status_code == 404
    assert http.get("/health").status_code == 200


class SlowVLM:
    """A VLM whose every chat_batch first sleeps (to make overload and shutdown observable)."""

    def __init__(self, vlm, delay: float):
        self._vlm, self._delay = vlm, delay

    def __getattr__(self, name):
        return getattr(self._vlm, name)

    def chat_batch(self, prompts, images=None, **kw):
        time.sleep(self._delay)
        return self._vlm.chat_batch(prompts, images, **kw)


class TokenDelayVLM(SlowVLM):
    """Every generated token takes `delay` seconds (to observe that a dropped stream stops generating)."""

    def chat_batch(self, prompts, images=None, on_token=None, **kw):
        def slow(i, tok):
            time.sleep(self._delay)
            on_token(i, tok)
        return self._vlm.chat_batch(prompts, images, on_token=slow, **kw)


def test_dropped_stream_stops_generation(model_dir):
    app = create_app(TokenDelayVLM(llavakit.load(str(model_dir)), 0.02), ServeSettings())
    body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 400, "temperature": 0, "stream": True}
    with BackgroundServer(app) as srv:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: generation is under way
        # 400 tokens would take 8 s; the worker stops at the next token once the client is gone
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": Q}], "max_tokens": 2})
        assert r.status_code == 200 and time.monotonic() - t0 < 4


def _post_all(url: str, n: int, timeout: float = 30) -> list[httpx.Response]:
    body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 3, "temperature": 0}
    with httpx.Client(base_url=url, timeout=timeout) as client:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(n), timeout=60))


def test_overload_answers_429(model_dir):
    app = create_app(SlowVLM(llavakit.load(str(model_dir)), 0.3),
                     ServeSettings(max_batch_size=1, max_wait_ms=0, max_queue=1))
    with BackgroundServer(app) as srv:
        codes = sorted(r.status_code for r in _post_all(srv.url, 6))
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200


def test_shutdown_answers_every_request(model_dir):
    app = create_app(SlowVLM(llavakit.load(str(model_dir)), 0.5),
                     ServeSettings(max_batch_size=1, max_wait_ms=0, shutdown_grace_s=0.2))
    srv = BackgroundServer(app).start()
    results: list = []
    t = threading.Thread(target=lambda: results.extend(_post_all(srv.url, 4)))
    t.start()
    deadline = time.monotonic() + 10
    while app.state.scheduler.stats["batches"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.stop(timeout=30)
    t.join(30)
    assert not t.is_alive() and time.monotonic() - t0 < 15
    assert len(results) == 4
    for r in results:  # finished, or told explicitly that it was not
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "shutting_down"
    assert any(r.status_code == 503 for r in results)
