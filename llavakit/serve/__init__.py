"""An OpenAI-compatible server for llavakit models: `llavakit serve --model SRC`.

    from llavakit.serve import ServeSettings, create_app, BackgroundServer
    app = create_app(llavakit.load("default"), ServeSettings(max_batch_size=8))
    with BackgroundServer(app) as srv:           # uvicorn in a thread, 127.0.0.1, a free port
        OpenAI(base_url=srv.url + "/v1", api_key="x").chat.completions.create(...)

Pieces: settings.py (limits), schemas.py (wire format), images.py (image_url fetching), scheduler.py
(the worker thread that owns the model and batches requests), app.py (routes, errors, streaming).
Needs the optional packages fastapi, uvicorn and httpx (imported when first used, not by this module).

Shutdown (Ctrl-C / SIGTERM, or `BackgroundServer.stop`): the scheduler stops accepting at once (new
requests: 503), then uvicorn stops accepting connections and waits for open ones; queued and running
requests may finish within `shutdown_grace_s`, after which they are answered with 503.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .scheduler import GenSettings, Scheduler, ServeError
from .settings import ServeSettings

__all__ = ["create_app", "ServeSettings", "Scheduler", "GenSettings", "ServeError", "BackgroundServer", "run"]


def __getattr__(name: str) -> Any:
    # create_app needs fastapi: imported on first use, so other modules of this package (the web demo)
    # import without it.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)


def _server_class() -> type:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, telling the scheduler to stop accepting as soon as an exit is requested."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            scheduler = getattr(getattr(self.config.app, "state", None), "scheduler", None)
            if scheduler is not None:  # from a signal handler: never block on the scheduler's lock here
                threading.Thread(target=scheduler.begin_shutdown, daemon=True).start()
            super().handle_exit(sig, frame)

    return _Server


def _config(app: Any, host: str, port: int, log_level: str, grace_s: float) -> Any:
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=grace_s + 5.0, access_log=False)


def run(vlm: Any, settings: ServeSettings, log_level: str = "info") -> None:
    """Serve `vlm` until interrupted (what `llavakit serve` calls)."""
    import logging

    if settings.torch_threads is not None:  # process-wide: only here, where the process is ours
        import torch
        torch.set_num_threads(settings.torch_threads)
    from .app import create_app

    app = create_app(vlm, settings)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.resolved_api_key() is None:
        logging.getLogger("llavakit.serve").warning(
            "serving on %s without an API key: anyone who can reach this address can use the model "
            "(set --api-key or LLAVAKIT_API_KEY)", settings.host)
    server = _server_class()(_config(app, settings.host, settings.port, log_level, settings.shutdown_grace_s))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it captured, after its clean shutdown
        pass


class BackgroundServer:
    """uvicorn serving `app` in a daemon thread (tests, benchmarks). Loopback by default; port 0 = free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        settings = getattr(app.state, "settings", None)
        grace = settings.shutdown_grace_s if settings is not None else 10.0
        self.app = app
        self.server = _server_class()(_config(app, host, port, log_level, grace))
        self.thread = threading.Thread(target=self.server.run, name="llavakit-serve-http", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the server did not start within {timeout} s")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting requests, let uvicorn finish open connections, run the lifespan shutdown."""
        scheduler = getattr(self.app.state, "scheduler", None)
        if scheduler is not None:
            scheduler.begin_shutdown()
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5.0)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
