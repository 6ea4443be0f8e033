"""`llavakit serve`: the OpenAI-compatible server on a tiny checkpoint, driven by the official `openai` client.

The server runs in a background thread on 127.0.0.1 with a free port; nothing here leaves loopback.
Answers are compared with the same model called in process (a second instance: a VLM is owned by the
server's worker thread).
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import llavakit  # noqa: E402
from llavakit.serve import BackgroundServer, GenSettings, Scheduler, ServeError, ServeSettings, create_app  # noqa: E402
from llavakit.data.images import load_image  # noqa: E402
from llavakit.serve.scheduler import Job  # noqa: E402
from tests.tiny_models import build  # noqa: E402

KEY = "test-key"
Q = "what is in the image ?"


def png_bytes(seed: int = 0, size: tuple[int, int] = (20, 30)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_message(text: str, *uris: str) -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    return [{"role": "user", "content": parts}]


def as_llavakit(text: str, n_images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}] + [{"type": "image"}] * n_images}]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """These tests check behaviour, not speed: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build("llava", tmp_path_factory.mktemp("serve-llava"))


@pytest.fixture(scope="module")
def ref(model_dir):
    """An in-process instance for reference answers (never shared with a server)."""
    return llavakit.load(str(model_dir))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-root")
    (root / "ok.png").write_bytes(png_bytes(3))
    (root.parent / "secret.png").write_bytes(png_bytes(4))
    return root


@pytest.fixture(scope="module")
def server(model_dir, image_root):
    app = create_app(llavakit.load(str(model_dir)),
                     ServeSettings(api_key=KEY, image_root=str(image_root), model_name="tiny-llava", max_wait_ms=50))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_plain_request(client, ref):
    msgs = [{"role": "system", "content": "describe the shape"}, {"role": "user", "content": Q}]
    r = client.chat.completions.create(model="tiny-llava", messages=msgs, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny-llava"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.chat(msgs, max_new_tokens=6)
    u = r.usage
    assert u.completion_tokens <= 6 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.visual_tokens == 0 and u.flops == ref.cost(u.prompt_tokens, u.completion_tokens).total_flops
    assert r.choices[0].finish_reason in ("stop", "length")


def test_image_request_usage_and_flops(client, ref):
    data = png_bytes(1)
    r = client.chat.completions.create(model="m", messages=image_message(Q, data_uri(data)), max_tokens=5,
                                       temperature=0)
    img = load_image(data)
    assert r.choices[0].message.content == ref.chat(as_llavakit(Q, 1), [img], max_new_tokens=5)
    u = r.usage
    assert u.visual_tokens == 16  # tiny model: 32 px / 8 px patches, CLS dropped
    # fixed-resolution model: the cost is asked about the preprocessed 32x32 view
    text_tokens = u.prompt_tokens - u.visual_tokens
    assert u.flops == ref.cost(text_tokens, u.completion_tokens, image_sizes=[(32, 32)]).total_flops


def test_stream_equals_non_stream(client):
    msgs = image_message("describe the colour", data_uri(png_bytes(2)))
    full = client.chat.completions.create(model="m", messages=msgs, max_tokens=10, temperature=0, stop=["w61"])
    chunks = list(client.chat.completions.create(model="m", messages=msgs, max_tokens=10, temperature=0,
                                                 stop=["w61"], stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.flops == full.usage.flops


def test_stream_raw_sse_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


FASTER = "fastervlm:keep=0.25"


def test_compression_fewer_visual_tokens_and_flops(client, ref):
    data = png_bytes(6)
    msgs = image_message(Q, data_uri(data))
    plain = client.chat.completions.create(model="m", messages=msgs, max_tokens=4, temperature=0)
    comp = client.chat.completions.create(model="m", messages=msgs, max_tokens=4, temperature=0,
                                          extra_body={"compression": FASTER})
    img = load_image(data)
    assert comp.choices[0].message.content == ref.chat(as_llavakit(Q, 1), [img], max_new_tokens=4,
                                                       compression=FASTER)
    p, c = plain.usage, comp.usage
    assert (p.visual_tokens, c.visual_tokens) == (16, 4)  # 4x4 patches; FasterVLM keeps round(16 * 0.25)
    assert p.compression == "none" and c.compression == FASTER
    assert c.visual_tokens_by_stage == {"vision": 16, "fastervlm": 4, "projector": 4, "llm": 4}
    assert c.prompt_tokens == p.prompt_tokens - 12
    text = c.prompt_tokens - c.visual_tokens
    assert c.flops == ref.cost(text, c.completion_tokens, image_sizes=[(32, 32)], compression=FASTER).total_flops
    assert c.flops < p.flops
    # the same spec as a mapping / a list: the same tokens and cost
    for spec in ({"fastervlm": {"keep": 0.25}}, [FASTER]):
        again = client.chat.completions.create(model="m", messages=msgs, max_tokens=4, temperature=0,
                                               extra_body={"compression": spec})
        assert again.choices[0].message.content == comp.choices[0].message.content
        assert (again.usage.visual_tokens, again.usage.flops) == (4, c.flops)
    # streamed: the same answer, and usage follows the compression too
    chunks = list(client.chat.completions.create(model="m", messages=msgs, max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"compression": FASTER}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == comp.choices[0].message.content
    assert (chunks[-1].usage.visual_tokens, chunks[-1].usage.flops) == (4, c.flops)


def test_in_llm_compression_cuts_flops_not_input_tokens(client, ref):
    data = png_bytes(7)
    msgs = image_message(Q, data_uri(data))
    spec = "fastv:layer=1:keep=0.5"
    plain = client.chat.completions.create(model="m", messages=msgs, max_tokens=3, temperature=0)
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=3, temperature=0,
                                       extra_body={"compression": spec})
    assert r.choices[0].message.content == ref.chat(as_llavakit(Q, 1), [load_image(data)], max_new_tokens=3,
                                                    compression=spec)
    assert r.usage.visual_tokens == 16  # FastV prunes inside the LM: the LM input keeps every token
    text = r.usage.prompt_tokens - 16
    assert r.usage.flops == ref.cost(text, r.usage.completion_tokens, image_sizes=[(32, 32)],
                                     compression=spec).total_flops
    if r.usage.completion_tokens == plain.usage.completion_tokens:
        assert r.usage.flops < plain.usage.flops


@pytest.mark.parametrize("spec, message", [
    ("magic:keep=0.1", "unknown compression method 'magic'; valid names: "),
    ("fastervlm:keep=2", "fastervlm: keep must be a ratio in (0, 1], got 2"),
    ("fastv:0.5", "expected key=value"),
    ("fastv:layer=7", "outside the LM's 2 layers"),
    ("fastervlm:keep=0.5:colour=red", "unknown parameter 'colour'"),
    ({"fastervlm": 0.5}, "must be a mapping"),
    (5, "a compression spec is a string or a list"),
])
def test_bad_compression_is_400_naming_the_param(client, spec, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=image_message(Q, data_uri(png_bytes(1))), max_tokens=2,
                                       extra_body={"compression": spec})
    assert e.value.status_code == 400 and message in e.value.body["message"]
    if spec == "magic:keep=0.1":  # the valid methods are named
        assert {"fastervlm", "fastv"} <= set(e.value.body["message"].split(": ")[-1].split(", "))
    assert e.value.body["param"] == "compression" and e.value.body["code"] == "invalid_compression"
    # the server keeps serving
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": Q}],
                                          max_tokens=1).choices[0].message.content is not None


def test_bad_inputs_are_400_and_server_keeps_serving(client):
    bad = [
        dict(messages=[{"role": "wizard", "content": Q}]),
        dict(messages=image_message(Q, "data:image/png;base64,@@@notbase64@@@")),
        dict(messages=image_message(Q, data_uri(png_bytes(0)[:60]))),  # truncated PNG
        dict(messages=[{"role": "user", "content": Q}], max_tokens=-1),
    ]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", **kw)
        assert e.value.body["message"]  # OpenAI error object with a message
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": Q}],
                                          max_tokens=2).choices[0].message.content is not None


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llava"]
    health = httpx.get(server.url + "/health", timeout=10)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    comp = health.json()["compression"]
    assert comp["default"] == "none" and {"fastervlm", "fastv"} <= set(comp["methods"])


def test_auth(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError) as e:
        c.models.list()
    assert e.value.status_code == 401
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}]}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_local_paths_only_inside_image_root(client, image_root, ref):
    ok = client.chat.completions.create(model="m", messages=image_message(Q, "ok.png"), max_tokens=3, temperature=0)
    img = load_image(image_root / "ok.png")
    assert ok.choices[0].message.content == ref.chat(as_llavakit(Q, 1), [img], max_new_tokens=3)
    for path in ("../secret.png", str(image_root.parent / "secret.png"), "file:///etc/passwd", "sub/../../secret.png"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=image_message(Q, path), max_tokens=2)
        assert "outside the server's image root" in str(e.value)


@pytest.fixture
def png_site():
    """A loopback HTTP server with one PNG (for allow_remote_images)."""
    payload = png_bytes(5)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            found = self.path == "/x.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(payload) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(payload)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", payload
    httpd.shutdown()
    httpd.server_close()


def test_remote_images_refused_by_default_and_fetched_when_allowed(client, model_dir, png_site, ref):
    base, payload = png_site
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=image_message(Q, base + "/x.png"), max_tokens=2)
    assert "remote image URLs are disabled" in str(e.value)
    app = create_app(llavakit.load(str(model_dir)), ServeSettings(allow_remote_images=True, max_image_bytes=100_000))
    with BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        r = c.chat.completions.create(model="m", messages=image_message(Q, base + "/x.png"), max_tokens=4,
                                      temperature=0)
        img = load_image(payload)
        assert r.choices[0].message.content == ref.chat(as_llavakit(Q, 1), [img], max_new_tokens=4)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="m", messages=image_message(Q, base + "/missing.png"), max_tokens=2)
        assert "HTTP 404" in str(e.value)


def test_timeout_is_504(model_dir):
    app = create_app(llavakit.load(str(model_dir)), ServeSettings(request_timeout_s=0.001))
    with BackgroundServer(app) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": Q}], "max_tokens": 50})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------ the scheduler

class _StubProcessor:
    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


class StubVLM:
    """Records chat_batch calls; the first call blocks until released, so later jobs pile up."""

    processor = _StubProcessor()

    def __init__(self):
        self.calls: list[tuple[int, dict]] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def generation_config(self):
        return type("G", (), {"eos_token_ids": (2,)})()

    def chat_batch(self, prompts, images, on_token=None, **kw):
        self.calls.append((len(prompts), dict(kw)))
        self.entered.set()
        assert self.release.wait(10)
        for i in range(len(prompts)):
            on_token(i, 7)
            on_token(i, 2)
        return [f"answer {p}" for p in prompts]


def _job(prompt, **gen) -> Job:
    return Job(messages=prompt, images=[], gen=GenSettings(**{"max_new_tokens": 4, **gen}),
               deadline=time.monotonic() + 30)


def test_scheduler_groups_compatible_requests():
    vlm = StubVLM()
    sched = Scheduler(vlm, max_batch_size=8, max_wait_ms=50, max_queue=16).start()
    try:
        first = sched.submit(_job("first"))
        assert vlm.entered.wait(10)  # the worker is busy with "first"; the rest queue up
        jobs = [_job("g1"), _job("g2", top_p=0.5, seed=3),  # greedy: top_p / seed do not matter
                _job("long", max_new_tokens=8), _job("g3"),
                _job("s1", temperature=0.7), _job("seeded", temperature=0.7, seed=1), _job("s2", temperature=0.7)]
        futures = [sched.submit(j) for j in jobs]
        vlm.release.set()
        results = [f.result(10) for f in [first] + futures]
    finally:
        sched.close()
    sizes = [n for n, _ in vlm.calls]
    assert sizes == [1, 3, 1, 2, 1]  # first | g1 g2 g3 | long | s1 s2 | seeded
    assert vlm.calls[1][1] == {"max_new_tokens": 4, "temperature": 0.0}
    assert vlm.calls[4][1]["seed"] == 1
    assert results[1].text == "answer g1" and results[1].batch_size == 3
    assert all(r.completion_tokens == 2 and r.finish_reason == "stop" for r in results)


def test_scheduler_keeps_compression_homogeneous_and_runs_unsafe_methods_alone():
    vlm = StubVLM()
    sched = Scheduler(vlm, max_batch_size=8, max_wait_ms=50, max_queue=16).start()
    try:
        first = sched.submit(_job("first"))
        assert vlm.entered.wait(10)
        jobs = [_job("c1", compression="fastervlm:keep=0.25"), _job("plain"),
                _job("u1", compression="unsafe:keep=0.5", batch_safe=False),
                _job("c2", compression="fastervlm:keep=0.25"), _job("c3", compression="fastervlm:keep=0.5"),
                _job("u2", compression="unsafe:keep=0.5", batch_safe=False), _job("off", compression="none")]
        futures = [sched.submit(j) for j in jobs]
        vlm.release.set()
        results = [f.result(10) for f in futures]
    finally:
        sched.close()
    calls = vlm.calls[1:]
    # groups in arrival order: one batch per spec; a spec that is not batch-safe runs one request per call
    assert [(n, kw.get("compression")) for n, kw in calls] == [
        (2, "fastervlm:keep=0.25"), (1, None), (1, "unsafe:keep=0.5"), (1, "fastervlm:keep=0.5"),
        (1, "unsafe:keep=0.5"), (1, "none")]
    assert [r.batch_size for r in results] == [2, 1, 1, 2, 1, 1, 1]


def test_scheduler_queue_full_and_shutdown_fail_explicitly():
    vlm = StubVLM()
    sched = Scheduler(vlm, max_batch_size=1, max_wait_ms=0, max_queue=2, shutdown_grace_s=0.1).start()
    running = sched.submit(_job("running"))
    assert vlm.entered.wait(10)
    queued = [sched.submit(_job(f"q{i}")) for i in range(2)]
    with pytest.raises(ServeError) as e:
        sched.submit(_job("one too many"))
    assert e.value.status == 429
    closer = threading.Thread(target=sched.close)
    closer.start()
    for f in queued:  # failed after the grace period, not left hanging
        with pytest.raises(ServeError) as e:
            f.result(10)
        assert e.value.status == 503
    with pytest.raises(ServeError):
        sched.submit(_job("late"))
    vlm.release.set()  # the running batch is aborted at its next token
    with pytest.raises(ServeError) as e:
        running.result(10)
    assert e.value.status == 503
    closer.join(10)
    assert not closer.is_alive()


def test_concurrent_greedy_requests_batch_and_match_single(server, ref):
    uris = [png_bytes(10 + i) for i in range(6)]
    prompts = ["what is in the image ?", "describe the colour of the square"]
    cases = [(prompts[i % 2], uris[i]) for i in range(6)]
    expected = [ref.chat(as_llavakit(p, 1), [load_image(d)], max_new_tokens=6)
                for p, d in cases]
    before = dict(server.app.state.scheduler.stats)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        def ask(case):
            p, d = case
            r = http.post("/v1/chat/completions", json={"messages": image_message(p, data_uri(d)), "max_tokens": 6,
                                                        "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, cases))
    assert [a["choices"][0]["message"]["content"] for a in answers] == expected
    stats = server.app.state.scheduler.stats
    assert stats["requests"] - before.get("requests", 0) == 6
    assert max(a["llavakit"]["batch_size"] for a in answers) > 1  # some really shared a batch


def test_concurrent_compressed_requests_batch_by_spec_and_match_single(server, ref):
    """Half the requests ask for FasterVLM: each batch holds one spec, and every answer equals the
    single in-process answer with the same compression."""
    datas = [png_bytes(20 + i) for i in range(8)]
    cases = [(datas[i], FASTER if i % 2 else None) for i in range(8)]
    expected = [ref.chat(as_llavakit(Q, 1), [load_image(d)], max_new_tokens=5, compression=c) for d, c in cases]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        def ask(case):
            d, c = case
            body = {"messages": image_message(Q, data_uri(d)), "max_tokens": 5, "temperature": 0}
            if c is not None:
                body["compression"] = c
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, cases))
    assert [a["choices"][0]["message"]["content"] for a in answers] == expected
    assert [a["usage"]["visual_tokens"] for a in answers] == [16, 4] * 4
    assert max(a["llavakit"]["batch_size"] for a in answers) > 1


def test_cli_serve_starts_answers_and_stops_on_sigint(model_dir):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "LLAVAKIT_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llavakit.cli", "serve", "--model", str(model_dir), "--host",
                             "127.0.0.1", "--port", str(port), "--torch-threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 45
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": Q}], max_tokens=3).choices
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401  # the key came from the environment
        proc.send_signal(signal.SIGINT)
        # uvicorn shuts down cleanly, then re-raises the signal it captured: exit status -SIGINT
        assert proc.wait(timeout=30) in (0, -signal.SIGINT)
        out = proc.stdout.read()
        assert "Application shutdown complete" in out and "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
