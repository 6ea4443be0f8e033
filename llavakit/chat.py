"""`llavakit chat`: a multi-turn terminal chat about an image.

Commands: `/image PATH` switches to a new image (and starts a new conversation, as LLaVA's CLI does),
`/reset` clears the conversation, `/help`, `/quit`. Bad input (a missing or broken image, an empty
line) prints an error and the session goes on.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import InputError

HELP = "commands: /image PATH (new image, new conversation), /reset, /help, /quit"


class ChatSession:
    """The conversation state; `handle(line)` returns what to print, or None to quit."""

    def __init__(self, vlm: Any, image: str | None = None, **gen: Any) -> None:
        self.vlm, self.gen = vlm, gen
        self.image: Any = None
        self.messages: list[dict[str, str]] = []
        if image:
            self.set_image(image)

    def set_image(self, path: str) -> str:
        self.image = self.vlm.processor.load_images([path])[0]  # InputError on a bad file
        self.messages = []
        return f"image: {path} ({self.image.width}x{self.image.height}); new conversation"

    def handle(self, line: str) -> str | None:
        line = line.strip()
        if not line:
            return ""
        if line in ("/quit", "/exit"):
            return None
        if line == "/help":
            return HELP
        if line == "/reset":
            self.messages = []
            return "conversation cleared"
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                raise InputError("usage: /image PATH")
            return self.set_image(path)
        if line.startswith("/"):
            raise InputError(f"unknown command {line.split()[0]}; {HELP}")
        first = not self.messages and self.image is not None
        self.messages.append({"role": "user", "content": ("<image>\n" + line) if first else line})
        images = [self.image] if self.image is not None else []
        try:
            reply = self.vlm.chat(self.messages, images=images, **self.gen)
        except Exception:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def run(vlm: Any, image: str | None, read: Callable[[str], str] = input, write: Callable[[str], None] = print,
        **gen: Any) -> int:
    try:
        session = ChatSession(vlm, image, **gen)
    except InputError as e:
        write(f"error: {e}")
        session = ChatSession(vlm, None, **gen)
    write(f"llavakit chat on {vlm.source}. {HELP}")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return 0
        try:
            out = session.handle(line)
        except InputError as e:
            write(f"error: {e}")
            continue
        if out is None:
            return 0
        if out:
            write(out if line.startswith("/") else f"assistant> {out}")
