"""Pydantic models of the OpenAI chat-completions wire format (the subset llavakit serves).

Requests are validated strictly (`strict=True`: a string is not silently a number, a number not a
boolean) so malformed input is a 400 naming the field, as OpenAI answers. Unknown top-level fields are
ignored (clients send options such as `user` or `frequency_penalty` freely); options that would change
the answer's shape and that llavakit does not implement (`n > 1`, `logprobs`, `tools`) are refused.

Responses are built as plain dicts by `app.py` (`completion_body`, `chunk_body`): they follow OpenAI's
`chat.completion` / `chat.completion.chunk` objects; `usage` adds `visual_tokens`, `flops`,
`visual_tokens_by_stage` and `compression` (see app.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

_STRICT = ConfigDict(strict=True, extra="ignore")


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str = Field(min_length=1)
    detail: str | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: Union[ImageURL, Annotated[str, Field(min_length=1)]]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    """One chat message. `developer` (OpenAI's newer name for `system`) is read as `system`."""

    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]
    name: str | None = None

    @property
    def chat_role(self) -> str:
        return "system" if self.role == "developer" else self.role

    def image_parts(self) -> list[ImagePart]:
        return [] if isinstance(self.content, str) else [p for p in self.content if isinstance(p, ImagePart)]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of `POST /v1/chat/completions`."""

    model_config = _STRICT
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # not in OpenAI's API; vLLM-style extra body field
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    # llavakit extra: a visual-token compression spec, as `llavakit.compression.parse_spec` takes it (a string
    # such as "fastervlm:keep=0.1", a {name: {param: value}} mapping, or a list of those). Any JSON value is
    # accepted here; app.py parses and checks it against the model (a bad spec: 400 with param "compression").
    compression: Any = None

    @model_validator(mode="after")
    def _supported(self) -> "ChatCompletionRequest":
        if self.n != 1:
            raise ValueError("n must be 1: llavakit returns one choice per request")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.tools:
            raise ValueError("tools / function calling are not supported")
        stops = self.stop_strings
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
