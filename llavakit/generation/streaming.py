"""Streaming text out of `generate` for one prompt: a producer thread and a queue.

Modelled on transformers' `TextIteratorStreamer` (generation runs in a thread, the consumer iterates
over text pieces). Our choices:
  - Pieces are deltas of `decode_fn(all tokens so far)`, holding back a trailing U+FFFD (an incomplete
    UTF-8 sequence) and any tail that could still become a stop string, so the concatenation of the
    pieces equals `trim_stop(decode_fn(tokens), stop_strings)` — the final text — exactly.
  - A consumer that stops early never deadlocks: the queue is unbounded (the producer never blocks),
    and leaving the `for` loop (or `close()`, or the `with` block) cancels the producer at its next
    token. The thread is a daemon and is joined on close.
  - An exception in the producer is re-raised in the consumer.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Sequence

from torch import Tensor

from ..errors import InputError
from .engine import GenerationConfig, generate, trim_stop

_END = object()


class _Cancelled(Exception):
    """Raised inside the producer's on_token to abort generation after the consumer left."""


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing chars of `text` must wait: a U+FFFD or a proper prefix of a stop string."""
    hold = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


class TokenIterator:
    """Iterate over decoded text pieces of one prompt's generation while it runs.

    Either `TokenIterator(decode_fn, stop_strings).start(lm, embeds, mask, config)` (or `stream(...)`),
    or pass the instance as `on_token` to your own `generate` call in a thread and call `end()` after.
    """

    def __init__(self, decode_fn: Callable[[list[int]], str], stop_strings: Sequence[str] = (),
                 timeout: float | None = None) -> None:
        self.decode_fn = decode_fn
        self.stop_strings = tuple(stop_strings)
        self.timeout = timeout
        self.tokens: list[int] = []
        self.result: Tensor | None = None  # generate's output once the producer finished
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._emitted = ""
        self._thread: threading.Thread | None = None

    # producer side -------------------------------------------------------------------------------
    def __call__(self, batch_index: int, token_id: int) -> None:
        """The `on_token` callback: record a token of prompt 0 and queue any newly final text."""
        if self._cancel.is_set():
            raise _Cancelled
        if batch_index != 0:
            return
        self.tokens.append(token_id)
        text = trim_stop(self.decode_fn(self.tokens), self.stop_strings)
        self._push(text[: len(text) - _held_back(text, self.stop_strings)])

    def end(self, error: BaseException | None = None) -> None:
        """Flush the remaining text (or pass `error` on) and close the stream."""
        if error is None:
            self._push(trim_stop(self.decode_fn(self.tokens), self.stop_strings))
        self._queue.put(error if error is not None else _END)

    def _push(self, text: str) -> None:
        if len(text) > len(self._emitted) and text.startswith(self._emitted):
            self._queue.put(text[len(self._emitted):])
            self._emitted = text

    def start(self, lm, inputs_embeds: Tensor, attention_mask: Tensor | None,
              config: GenerationConfig) -> "TokenIterator":
        """Run `generate` for one prompt (batch 1) in a daemon thread feeding this iterator."""
        if inputs_embeds.shape[0] != 1:
            raise InputError(f"TokenIterator streams one prompt; got a batch of {inputs_embeds.shape[0]}")
        if self._thread is not None:
            raise RuntimeError("TokenIterator.start called twice")

        def run() -> None:
            try:
                self.result = generate(lm, inputs_embeds, attention_mask, config,
                                       decode_fn=self.decode_fn, on_token=self)
            except _Cancelled:
                self._queue.put(_END)
            except BaseException as e:  # handed to the consumer
                self.end(e)
            else:
                self.end()

        self._thread = threading.Thread(target=run, name="llavakit-generate", daemon=True)
        self._thread.start()
        return self

    # consumer side -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self._queue.get(timeout=self.timeout)
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the producer (if still running) and wait for its thread."""
        self._cancel.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "TokenIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream(lm, inputs_embeds: Tensor, attention_mask: Tensor | None, config: GenerationConfig,
           decode_fn: Callable[[list[int]], str]) -> TokenIterator:
    """Start generating for one prompt; iterate the result for text pieces."""
    return TokenIterator(decode_fn, config.stop_strings).start(lm, inputs_embeds, attention_mask, config)
