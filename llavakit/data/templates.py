"""Chat templates by name, for checkpoints that ship none (a shipped Jinja template always wins).

- `vicuna_v1`: LLaVA-1.5's conversation format (`conv_vicuna_v1` in the LLaVA repo): system line,
  "USER: ... ASSISTANT: ...</s>".
- `llava_hf`: the template of the llava-hf/llava-1.5 processors: "USER: <image>\\n... ASSISTANT:".
- `mistral_instruct`: llava-v1.6-mistral: "[INST] <image>\\n... [/INST]".
- `chatml`: Qwen2 / SmolLM2: "<|im_start|>role\\n...<|im_end|>\\n".
- `plain`: the message texts joined by newlines (captioning / pre-training style).

Messages are transformers chat messages: {"role": "system"|"user"|"assistant", "content": str or a
list of parts {"type": "text", "text": ...} / {"type": "image"}}; image parts become "<image>" tags.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ..errors import InputError
from ..registry import Registry

IMAGE_TAG = "<image>"
ROLES = ("system", "user", "assistant")

Message = Mapping[str, Any]
TEMPLATES: Registry[Callable[[list[tuple[str, str]], bool], str]] = Registry("chat template")

VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def message_text(message: Message) -> str:
    """The text of one message with image parts as <image> tags (images first, as LLaVA puts them)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise InputError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    images, texts = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in ("image", "image_url"):
            images.append(IMAGE_TAG + "\n")
        elif kind == "text":
            texts.append(str(part.get("text", "")))
        else:
            raise InputError(f"unknown content part {part!r}; valid types: text, image")
    return "".join(images) + " ".join(texts)


def normalize(messages: Sequence[Message]) -> list[tuple[str, str]]:
    out = []
    for m in messages:
        role = m.get("role") if isinstance(m, Mapping) else None
        if role not in ROLES:
            raise InputError(f"unknown chat role {role!r}; valid roles: {', '.join(ROLES)}")
        out.append((role, message_text(m)))
    if not out:
        raise InputError("empty conversation")
    return out


@TEMPLATES.register("vicuna_v1")
def _vicuna(msgs: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    system = next((t for r, t in msgs if r == "system"), VICUNA_SYSTEM)
    s = system + " "
    for role, text in msgs:
        if role == "user":
            s += f"USER: {text} "
        elif role == "assistant":
            s += f"ASSISTANT: {text}</s>"
    return s + "ASSISTANT:" if add_generation_prompt else s


@TEMPLATES.register("llava_hf")
def _llava_hf(msgs: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    s = ""
    for role, text in msgs:
        s += (f"{role.upper()}: " if role != "system" else "") + text + " "
    return s + "ASSISTANT:" if add_generation_prompt else s


@TEMPLATES.register("mistral_instruct")
def _mistral(msgs: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    s = ""
    for role, text in msgs:
        if role == "user":
            s += f"[INST] {text} [/INST]"
        elif role == "assistant":
            s += f" {text}</s>"
    return s


@TEMPLATES.register("chatml")
def _chatml(msgs: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    s = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in msgs)
    return s + "<|im_start|>assistant\n" if add_generation_prompt else s


@TEMPLATES.register("plain")
def _plain(msgs: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    return "\n".join(text for _, text in msgs)


def render(name: str, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    return TEMPLATES.get(name)(normalize(messages), add_generation_prompt)
