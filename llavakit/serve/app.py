"""`create_app(vlm, settings) -> FastAPI`: the OpenAI-compatible HTTP layer in front of a `Scheduler`.

Endpoints:
- `POST /v1/chat/completions`: OpenAI chat completions (string or `text` / `image_url` content parts;
  `stream: true` answers with server-sent `chat.completion.chunk` events ending in `data: [DONE]`).
- `GET /v1/models`: the one served model. `GET /health`: liveness, queue depth, batching counters.

One request's path: auth (`Authorization: Bearer KEY` on /v1/*, 401) -> body read with a byte cap
(413) -> JSON parse (400) -> schema validation (400, see schemas.py) -> limits (images per request,
prompt characters, max_tokens; 400) -> images fetched and decoded (serve/images.py; 400) -> prompt
rendered and run through the processor once, off the event loop, to validate it and count tokens
(400 for a prompt that does not fit the context) -> `Scheduler.submit` (429 queue full, 503 shutting
down) -> the answer, or 504 after `request_timeout_s`. Every error is OpenAI's
`{"error": {"message", "type", "param", "code"}}`; unexpected exceptions are 500 and the server keeps
serving. The `model` field of a request is not checked: whatever it names, the one loaded model answers
(responses carry the served name).

`usage` = OpenAI's prompt_tokens (text + visual tokens the LM reads), completion_tokens (tokens generated,
EOS included) and total_tokens, plus llavakit's `visual_tokens` (image tokens in the LM input, after any
pre-LLM compression), `flops` (`VLM.cost(..., compression=...).total_flops`: analytic, multiply-add = 2
FLOPs, following the request's compression, in-LLM pruning included; image sizes as the processor produced
them, i.e. the preprocessed view for fixed-resolution models and the original size for anyres ones, which
is what `VLM.cost` expects), `visual_tokens_by_stage` (the count after each stage: vision tower, each
pre-LLM method, projector, LM input) and `compression` (the canonical spec that ran, "none" when off).

Streaming: the job runs alone; the worker's `on_token` hands each token id to the event loop, which
decodes the tokens so far and sends the part of the text that can no longer change (a trailing U+FFFD,
a tail that may still become a stop string, and trailing whitespace wait). When generation ends, the rest
of the answer `chat_batch` returned is sent, so the concatenated deltas equal the non-streamed answer.

Compression: the llavakit extra body field `compression` (openai client: `extra_body={"compression":
"fastervlm:keep=0.1"}`) is a spec as `llavakit.compression.parse_spec` takes it: a string, a {name: {param:
value}} mapping or a list of those; "none" turns off a default the model was loaded with. It is parsed and
checked against the model (`Compression.parse(spec).check(model)`) before the request is queued: a bad spec
(unknown method, a keep outside (0, 1], an impossible composition, a model that cannot do it) is a 400
with the `InputError` message and `param: "compression"`. Without the field, the model's own default
(`llavakit.load(..., compression=...)`) applies. The scheduler batches only requests with the same
canonical spec, and runs a spec that is not `batch_safe` one request at a time. `GET /health` lists the
registered methods and the default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..compression import method_names
from ..data.templates import IMAGE_TAG
from ..errors import InputError
from ..generation.engine import trim_stop
from .images import fetch_image
from .scheduler import GenSettings, Job, JobResult, Scheduler, ServeError, timed_out
from .schemas import ChatCompletionRequest, ImagePart, Message, error_body
from .settings import ServeSettings

log = logging.getLogger("llavakit.serve")

_DRAIN_FACTOR = 4  # a too-large body is read and discarded up to this many times the limit, then cut off


def create_app(vlm: Any, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving `vlm`. Its scheduler (app.state.scheduler) starts and stops with the lifespan."""
    settings = settings or ServeSettings()
    scheduler = Scheduler(vlm, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                          max_queue=settings.max_queue, shutdown_grace_s=settings.shutdown_grace_s)
    state = _State(vlm, settings, scheduler)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="llavakit", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.state.settings = settings
    app.state.model_name = state.model_name

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, e: ServeError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(InputError)
    async def _input_error(_: Request, e: InputError) -> JSONResponse:
        return _error(ServeError(str(e), 400))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(ServeError(str(e.detail), e.status_code, code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error(ServeError(_validation_message(e.errors()), 400))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(ServeError(f"internal error: {type(e).__name__}: {e}", 500, "internal_error", "server_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.accepting
        body = {"status": "ok" if ok else "shutting_down", "model": state.model_name, "queued": scheduler.queued,
                "max_queue": settings.max_queue, "busy": scheduler.busy, "stats": dict(scheduler.stats),
                "compression": {"default": _spec_name(state.default_compression), "methods": method_names()}}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        state.check_auth(request)
        return {"object": "list", "data": [state.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        state.check_auth(request)
        if model_id != state.model_name:
            raise ServeError(f"model {model_id!r} not found; this server serves {state.model_name!r}", 404,
                             "model_not_found")
        return state.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        state.check_auth(request)
        body = await _read_body(request, settings.max_body_bytes)
        req = _parse(body)
        return await state.complete(req)

    return app


class _State:
    """What the route handlers share: the model, its settings, the scheduler and derived facts."""

    def __init__(self, vlm: Any, settings: ServeSettings, scheduler: Scheduler) -> None:
        self.vlm = vlm
        self.settings = settings
        self.scheduler = scheduler
        self.api_key = settings.resolved_api_key()
        self.model_name = settings.model_name or _default_name(getattr(vlm, "source", ""))
        self.created = int(time.time())
        self.default_compression = getattr(vlm, "compression", None)  # a `Compression` from llavakit.load, or None
        self.context = int(vlm.config.lm.max_position_embeddings)
        self.eos = frozenset(vlm.generation_config().eos_token_ids)
        self.prep_lock = threading.Lock()  # one request's processor run at a time (off the event loop)

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llavakit"}

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ServeError("missing or incorrect API key: send 'Authorization: Bearer <key>'", 401,
                             "invalid_api_key")

    # ------------------------------------------------------------------ one request
    async def complete(self, req: ChatCompletionRequest) -> Any:
        s = self.settings
        deadline = time.monotonic() + s.request_timeout_s
        gen = self._gen_settings(req)
        messages, images = await self._messages(req.messages)
        prep = await asyncio.to_thread(self._prepare, messages, images, gen.max_new_tokens,
                                       req.requested_max_tokens is not None, self._effective(gen))
        if prep["max_new_tokens"] != gen.max_new_tokens:
            gen = dataclasses.replace(gen, max_new_tokens=prep["max_new_tokens"])
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(messages, images, gen, prep, deadline, include_usage)
        job = Job(messages=messages, images=images, gen=gen, deadline=deadline)
        future = asyncio.wrap_future(self.scheduler.submit(job))
        try:
            result: JobResult = await asyncio.wait_for(future, timeout=max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            job.future.cancel()
            raise timed_out(s.request_timeout_s) from None
        except InputError as e:
            raise ServeError(str(e), 400) from None
        return self._completion_body(result, prep)

    def _gen_settings(self, req: ChatCompletionRequest) -> GenSettings:
        s = self.settings
        max_tokens = req.requested_max_tokens
        if max_tokens is None:
            max_tokens = s.default_max_tokens
        elif max_tokens > s.max_tokens_limit:
            raise ServeError(f"max_tokens={max_tokens} is more than this server's limit of {s.max_tokens_limit}",
                             400, "max_tokens_too_large", param="max_tokens")
        key, plan = None, None  # no field: the model's own default compression
        if req.compression is not None:
            plan = self._compression(req.compression)
            key = _spec_name(plan)
        effective = plan if req.compression is not None else self.default_compression
        return GenSettings(max_new_tokens=max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
                           top_k=req.top_k, stop=req.stop_strings, seed=req.seed, compression=key, plan=plan,
                           batch_safe=effective is None or bool(effective.batch_safe))

    def _compression(self, spec: Any) -> Any:
        """The request's spec parsed and checked against the model (None = off); a bad one is a 400."""
        from ..compression import Compression

        try:
            plan = Compression.parse(spec)
            if plan is not None:
                plan.check(self.vlm.model)
        except InputError as e:
            raise ServeError(str(e), 400, "invalid_compression", param="compression") from None
        except (TypeError, ValueError) as e:  # a method's constructor refusing a parameter it does not type-check
            raise ServeError(f"bad compression spec {spec!r}: {e}", 400, "invalid_compression",
                             param="compression") from None
        return plan

    def _effective(self, gen: GenSettings) -> Any:
        """The `Compression` a request runs with: its own, or the model's default when it named none."""
        return self.default_compression if gen.compression is None else gen.plan

    async def _messages(self, msgs: list[Message]) -> tuple[list[dict[str, Any]], list[Any]]:
        """OpenAI messages -> llavakit chat messages ({"type": "image"} parts) and decoded images."""
        s = self.settings
        n_images = sum(len(m.image_parts()) for m in msgs)
        if n_images > s.max_images_per_request:
            raise ServeError(f"{n_images} images in one request; this server takes at most "
                             f"{s.max_images_per_request}", 400, "too_many_images", param="messages")
        chars = sum(len(m.content) if isinstance(m.content, str) else
                    sum(len(p.text) for p in m.content if not isinstance(p, ImagePart)) for m in msgs)
        if chars > s.max_prompt_chars:
            raise ServeError(f"the messages hold {chars} characters of text; this server takes at most "
                             f"{s.max_prompt_chars}", 400, "prompt_too_long", param="messages")
        out: list[dict[str, Any]] = []
        images: list[Any] = []
        for i, m in enumerate(msgs):
            if isinstance(m.content, str):
                _check_text(m.content, i)
                out.append({"role": m.chat_role, "content": m.content})
                continue
            parts: list[dict[str, Any]] = []
            for p in m.content:
                if isinstance(p, ImagePart):
                    if m.chat_role != "user":
                        raise ServeError(f"messages[{i}]: images are only accepted in user messages", 400,
                                         param="messages")
                    try:
                        images.append(await fetch_image(p.url, s))
                    except InputError as e:
                        raise ServeError(f"messages[{i}]: {e}", 400, "invalid_image", param="messages") from None
                    parts.append({"type": "image"})
                else:
                    _check_text(p.text, i)
                    parts.append({"type": "text", "text": p.text})
            out.append({"role": m.chat_role, "content": parts})
        return out, images

    def _prepare(self, messages: list[dict[str, Any]], images: list[Any], max_new_tokens: int,
                 explicit: bool, compression: Any = None) -> dict[str, Any]:
        """Render and process the request once (as chat_batch will, with the same compression): validates
        it and counts its tokens (visual tokens after pre-LLM compression).

        A request without max_tokens gets `default_max_tokens`, cut to what the context has left."""
        vlm = self.vlm
        with self.prep_lock:
            prompt = vlm.build_prompt(messages, images)
            inputs = vlm.processor(text=[prompt], images=images or None, compression=compression)
        mask = inputs["attention_mask"][0]
        total = int(mask.sum())
        image_token = getattr(vlm.config, "image_token_id", None) if images else None
        visual = int((inputs["input_ids"][0] == image_token).sum()) if image_token is not None else 0
        if "image_sizes" in inputs:  # anyres: original sizes
            sizes = [tuple(int(x) for x in s) for s in inputs["image_sizes"].tolist()]
        elif "pixel_values" in inputs:  # fixed resolution: the preprocessed view
            sizes = [tuple(int(x) for x in inputs["pixel_values"].shape[-2:])] * int(inputs["pixel_values"].shape[0])
        else:
            sizes = []
        if not explicit:
            max_new_tokens = min(max_new_tokens, self.context - total)
        if total >= self.context:
            raise ServeError(f"the prompt is {total} tokens; the model's context is {self.context}", 400,
                             "context_length_exceeded", param="messages")
        if total + max_new_tokens > self.context:
            raise ServeError(f"this request needs {total} prompt tokens + max_tokens={max_new_tokens} = "
                             f"{total + max_new_tokens} positions; the model's context is {self.context}", 400,
                             "context_length_exceeded", param="messages")
        return {"prompt_tokens": total, "visual_tokens": visual, "text_tokens": total - visual, "image_sizes": sizes,
                "max_new_tokens": max_new_tokens, "compression": compression}

    def _usage(self, prep: dict[str, Any], completion: int) -> dict[str, Any]:
        comp = prep["compression"]
        cost = self.vlm.cost(prompt_tokens=prep["text_tokens"], new_tokens=completion,
                             image_sizes=prep["image_sizes"], compression=comp)
        return {"prompt_tokens": prep["prompt_tokens"], "completion_tokens": completion,
                "total_tokens": prep["prompt_tokens"] + completion, "visual_tokens": prep["visual_tokens"],
                "flops": int(cost.total_flops), "visual_tokens_by_stage": dict(cost.visual_tokens),
                "compression": _spec_name(comp)}

    def _completion_body(self, r: JobResult, prep: dict[str, Any]) -> dict[str, Any]:
        return {"id": _new_id(), "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": r.finish_reason, "logprobs": None}],
                "usage": self._usage(prep, r.completion_tokens),
                "system_fingerprint": None, "llavakit": {"batch_size": r.batch_size, "queued_s": round(r.queued_s, 4)}}

    # ------------------------------------------------------------------ streaming
    async def _stream(self, messages: list[dict[str, Any]], images: list[Any], gen: GenSettings,
                      prep: dict[str, Any], deadline: float, include_usage: bool) -> Any:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        done = object()

        def on_token(tok: int) -> None:  # worker thread
            loop.call_soon_threadsafe(tokens.put_nowait, tok)

        job = Job(messages=messages, images=images, gen=gen, deadline=deadline, on_token=on_token)
        self.scheduler.submit(job)
        job.future.add_done_callback(lambda _: _call_soon(loop, tokens.put_nowait, done))

        async def next_item() -> Any:
            try:
                return await asyncio.wait_for(tokens.get(), timeout=max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                job.future.cancel()
                raise timed_out(self.settings.request_timeout_s) from None

        first = await next_item()  # errors before the first token are plain HTTP errors
        if first is done:
            _raise_job_error(job)
        ident, created = _new_id(), int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [] if usage is not None else
                    [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            deltas = _Deltas(self.vlm.processor.decode, self.eos, gen.stop)
            item = first
            try:
                yield chunk({"role": "assistant", "content": ""})
                while item is not done:
                    piece = deltas.feed(item)
                    if piece:
                        yield chunk({"content": piece})
                    item = await next_item()
                if job.future.cancelled():
                    raise timed_out(self.settings.request_timeout_s)
                error = job.future.exception()
                if error is not None:
                    raise error
                result: JobResult = job.future.result()
                rest = deltas.finish(result.text)
                if rest:
                    yield chunk({"content": rest})
                yield chunk({}, finish=result.finish_reason)
                if include_usage:
                    yield chunk({}, usage=self._usage(prep, result.completion_tokens))
            except Exception as e:  # noqa: BLE001 - mid-stream: the status is sent, report it in the stream
                err = e if isinstance(e, ServeError) else ServeError(str(e), 400 if isinstance(e, InputError) else 500)
                yield f"data: {json.dumps(error_body(err.message, err.type, err.code))}\n\n"
            finally:
                job.future.cancel()  # the client left, or we are done: stop generating (no-op once resolved)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Deltas:
    """Token ids in, text pieces out, such that the pieces concatenate to the final answer.

    The final answer is `chat_batch`'s: decode(ids before EOS), cut at the first stop string, stripped.
    A piece is sent only when it can no longer change: a trailing U+FFFD (incomplete UTF-8), a tail that
    is a proper prefix of a stop string and trailing whitespace wait for more tokens.
    """

    def __init__(self, decode: Any, eos: frozenset[int], stops: tuple[str, ...]) -> None:
        self.decode, self.eos, self.stops = decode, eos, stops
        self.ids: list[int] = []
        self.sent = ""
        self.ended = False

    def feed(self, tok: int) -> str:
        if self.ended:
            return ""
        if tok in self.eos:
            self.ended = True
            return ""
        self.ids.append(tok)
        text = trim_stop(self.decode(self.ids), self.stops)
        text = text[: len(text) - _held_back(text, self.stops)].strip()
        if len(text) > len(self.sent) and text.startswith(self.sent):
            piece, self.sent = text[len(self.sent):], text
            return piece
        return ""

    def finish(self, final: str) -> str:
        if final.startswith(self.sent):
            piece, self.sent = final[len(self.sent):], final
            return piece
        log.warning("streamed text %r is not a prefix of the final answer %r", self.sent, final)
        return ""


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


# ---------------------------------------------------------------------------------------- helpers

def _check_text(text: str, i: int) -> None:
    if IMAGE_TAG in text:  # the chat template would read it as an image slot
        raise ServeError(f"messages[{i}]: text may not contain the {IMAGE_TAG} tag; send images as image_url "
                         "content parts", 400, "invalid_text", param="messages")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 above `limit` bytes (the rest is drained, up to a cap, so the client
    reads the answer instead of a reset connection)."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            too_big = True
            chunks.clear()
            if total > _DRAIN_FACTOR * limit:
                break
        elif not too_big:
            chunks.append(chunk)
    if too_big:
        raise ServeError(f"the request body is more than this server's limit of {limit} bytes", 413,
                         "request_too_large")
    return b"".join(chunks)


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServeError(f"the request body is not valid JSON: {e}", 400, "invalid_json") from None
    if not isinstance(obj, dict):
        raise ServeError(f"the request body must be a JSON object, got {type(obj).__name__}", 400, "invalid_json")
    try:
        return ChatCompletionRequest.model_validate(obj)
    except ValidationError as e:
        raise ServeError(_validation_message(e.errors()), 400, "invalid_request") from None


def _validation_message(errors: list[dict[str, Any]], limit: int = 3) -> str:
    parts = []
    for err in errors[:limit]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "invalid request: " + "; ".join(parts) + more


def _error(e: ServeError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status)


def _raise_job_error(job: Job) -> None:
    if job.future.cancelled():
        raise ServeError("the request was cancelled", 503, "cancelled", "server_error")
    error = job.future.exception()
    if isinstance(error, InputError):
        raise ServeError(str(error), 400)
    if error is not None:
        raise error


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed (server stopped)
        pass


def _spec_name(compression: Any) -> str:
    """The canonical spec of a `Compression` ("none" for None)."""
    return "none" if compression is None else compression.spec


def _default_name(source: str) -> str:
    name = Path(str(source).rstrip("/\\")).name if source else ""
    return name or "llavakit"


def _new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def _version() -> str:
    from .. import __version__
    return __version__
