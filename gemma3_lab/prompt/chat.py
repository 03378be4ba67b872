"""The Gemma 3 chat format in plain Python (docs/gemma3.md §5.5): messages -> the prompt string the
instruction-tuned models were trained on, plus the image payloads those messages carry."""

from __future__ import annotations

from typing import Any

BOS, START_OF_TURN, END_OF_TURN, START_OF_IMAGE = "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"
_IMAGE_KEYS = ("image", "url", "path")
# Gemma calls the assistant "model"; a message already written that way is taken as is
_ROLE_NAMES = {"user": "user", "assistant": "model", "model": "model"}


def apply_chat_template(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render `[{"role", "content"}, ...]` the way Gemma 3's reference chat template does.

    A leading system message is not a turn: its text plus "\\n\\n" opens the first turn, and it
    is not trimmed (the reference template does not trim it either). The turns must alternate
    user / assistant starting with user. Content is a string or a list of items:
    `{"type": "text", "text": ...}` (trimmed) and `{"type": "image", ...}` (`<start_of_image>`,
    which the processor later expands into the image's soft tokens, docs/gemma3.md §5.3).
    """
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    messages = list(messages)
    prefix, offset = "", 0  # offset: error messages count from the caller's first message
    if messages and _role(messages[0], 0) == "system":
        prefix, offset = _system_text(messages[0]) + "\n\n", 1
        messages = messages[1:]
    if not messages:
        raise ValueError("a chat needs at least one user message (the system text is folded into it)")

    parts = [BOS]
    for i, message in enumerate(messages):
        role = _role(message, i + offset)
        expected = "user" if i % 2 == 0 else "assistant"
        if _ROLE_NAMES.get(role) != _ROLE_NAMES[expected]:
            raise ValueError(f"message {i + offset} has role {role!r} but roles must alternate user/assistant/user/..."
                             f" starting with user (a system message may only come first); expected {expected!r}")
        parts += [START_OF_TURN, _ROLE_NAMES[role], "\n", prefix if i == 0 else "",
                  _render_content(message.get("content"), i + offset), END_OF_TURN, "\n"]
    if add_generation_prompt:
        parts += [START_OF_TURN, "model\n"]
    return "".join(parts)


def images_in_messages(messages: list[dict[str, Any]]) -> list[Any]:
    """The image payloads (the value under "image", "url" or "path") of every image item, in the
    order their `<start_of_image>` placeholders appear in the rendered prompt. Image items with
    no payload are skipped: their images come in separately."""
    found = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, (list, tuple)):
            continue
        for item in content:
            if _is_image(item):
                payload = next((item[k] for k in _IMAGE_KEYS if item.get(k) is not None), None)
                if payload is not None:
                    found.append(payload)
    return found


def _role(message: Any, index: int) -> str:
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError(f"message {index} must be a dict with a 'role' and a 'content', got {message!r:.80}")
    return message["role"]


def _system_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    # the reference template takes the first item's text; we take the first *text* item
    texts = [item.get("text") for item in content or () if isinstance(item, dict) and item.get("type") == "text"]
    if not texts or not isinstance(texts[0], str):
        raise ValueError("the system message has no text: give a string or a {'type': 'text'} item")
    return texts[0]


def _is_image(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    # {"image": ...} with no "type" is accepted too, as transformers' processors do
    return item.get("type") == "image" or ("type" not in item and any(k in item for k in _IMAGE_KEYS))


def _render_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content.strip()
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"message {index}: content must be a string or a list of items, got {type(content).__name__}")
    out = []
    for item in content:
        if _is_image(item):
            out.append(START_OF_IMAGE)
        elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            out.append(item["text"].strip())
        else:
            # the reference template silently drops unknown items; an error is kinder than a lost input
            raise ValueError(f"message {index}: cannot render content item {item!r:.80} "
                             "(expected {'type': 'text', 'text': ...} or {'type': 'image', ...})")
    return "".join(out)
