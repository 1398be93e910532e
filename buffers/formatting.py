"""Prompt formatting: the one place where a dataset prompt becomes the token ids the student sees.

A prompt is a string or a list of chat messages (``[{"role": ..., "content": ...}]``).
With a chat template (``data.chat_template: true``, the default when the student's
tokenizer has one) it is rendered by the tokenizer's own
``apply_chat_template(messages, add_generation_prompt=True, **chat_template_kwargs)``
(e.g. Qwen3's ``enable_thinking``), after an optional ``system_prompt`` is put first and
an optional ``prompt_template`` (``"{prompt}\\nPut the final answer in \\boxed{}."``) is
applied to the last user message. With ``chat_template: false`` (base models) the text
is the prompt string itself, after the template.

Samplers, teachers and evaluation all consume the ids produced here (``Prompt.prompt_ids``),
so the teacher scores exactly the tokens the student was conditioned on (SPEC §1). A
privileged teacher (``teachers.<name>.privileged``) gets its own ids from ``encode_privileged``:
the student's messages with the last user turn put through the teacher's template, where
``{prompt}`` is that turn as the student sees it and ``{context}`` the row's privileged column.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, str]]


class PromptFormatError(ValueError):
    """A prompt that cannot be formatted; the message says which field and why."""


@dataclass(frozen=True)
class PromptFormat:
    """How the prompts of one source are rendered (from ``data`` and the source's settings)."""

    chat_template: bool
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None
    prompt_template: str | None = None  # must contain "{prompt}"


def as_messages(prompt: Any) -> Messages | None:
    """The prompt as chat messages, or None if it is a plain string. Raises on anything else."""
    if isinstance(prompt, str):
        return None
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        out = []
        for i, m in enumerate(prompt):
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise PromptFormatError(f"message {i} needs string `role` and `content` (got {dict(m)!r:.120})")
            out.append({"role": role, "content": content})
        return out
    raise PromptFormatError(f"a prompt must be a string or a non-empty list of chat messages, "
                            f"got {type(prompt).__name__} {prompt!r:.80}")


def _apply_template(text: str, template: str | None) -> str:
    return text if template is None else template.replace("{prompt}", text)


def user_text(prompt: Any) -> str:
    """The prompt's text as the verifier sees it: the string, or the last user message's content
    (a code stub, a math question), without any template."""
    msgs = as_messages(prompt)
    if msgs is None:
        return prompt
    users = [m["content"] for m in msgs if m["role"] == "user"]
    return users[-1] if users else msgs[-1]["content"]


def render_messages(prompt: Any, fmt: PromptFormat) -> Messages:
    """System prompt first (unless the row has its own), template on the last user message."""
    msgs = as_messages(prompt)
    if msgs is None:
        msgs = [{"role": "user", "content": prompt}]
    if fmt.prompt_template is not None:
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last_user is None:
            raise PromptFormatError("`prompt_template` is set but the messages have no user turn to apply it to")
        msgs = [dict(m) for m in msgs]
        msgs[last_user]["content"] = _apply_template(msgs[last_user]["content"], fmt.prompt_template)
    if fmt.system_prompt is not None and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": fmt.system_prompt}, *msgs]
    return msgs


def render_text(prompt: Any, fmt: PromptFormat, tokenizer) -> str:
    """The full text the student is conditioned on."""
    if fmt.chat_template:
        return tokenizer.apply_chat_template(render_messages(prompt, fmt), tokenize=False,
                                             add_generation_prompt=True, **dict(fmt.chat_template_kwargs))
    if as_messages(prompt) is not None:
        raise PromptFormatError("the prompt is a list of chat messages but `data.chat_template` is false; "
                                "enable the chat template or give plain-string prompts")
    text = _apply_template(prompt, fmt.prompt_template)
    return text if fmt.system_prompt is None else f"{fmt.system_prompt}\n{text}"


def encode(prompt: Any, fmt: PromptFormat, tokenizer) -> list[int]:
    """Token ids of the rendered prompt. The chat template already carries its special tokens
    (BOS, ``<|im_start|>``), so nothing is added again; raw text gets the tokenizer's own
    special tokens (a base model's BOS), as ``tokenizer(text)`` would."""
    text = render_text(prompt, fmt, tokenizer)
    return list(tokenizer(text, add_special_tokens=not fmt.chat_template)["input_ids"])


def fill_privileged(template: str, prompt_text: str, context: str) -> str:
    """``template`` with ``{prompt}`` and ``{context}`` replaced in one pass, so a brace pair inside the
    prompt or the context (LaTeX, code) is never read as a placeholder."""
    return re.sub(r"\{(prompt|context)\}", lambda m: prompt_text if m.group(1) == "prompt" else context, template)


def encode_privileged(prompt: Any, fmt: PromptFormat, template: str, context: str, tokenizer) -> list[int]:
    """Token ids of a privileged teacher's prompt: the student's rendering (system prompt, source
    template, chat template) with its last user turn ``t`` replaced by ``template`` filled with
    ``{prompt}`` = t and ``{context}`` = ``context``."""
    if fmt.chat_template:
        msgs = render_messages(prompt, fmt)
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=len(msgs) - 1)
        msgs = [dict(m) for m in msgs]
        msgs[last_user]["content"] = fill_privileged(template, msgs[last_user]["content"], context)
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                             **dict(fmt.chat_template_kwargs))
    else:
        if as_messages(prompt) is not None:
            raise PromptFormatError("the prompt is a list of chat messages but `data.chat_template` is false; "
                                    "enable the chat template or give plain-string prompts")
        text = fill_privileged(template, _apply_template(prompt, fmt.prompt_template), context)
        text = text if fmt.system_prompt is None else f"{fmt.system_prompt}\n{text}"
    return list(tokenizer(text, add_special_tokens=not fmt.chat_template)["input_ids"])


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat_template(setting: bool | None, tokenizer, model_path: str) -> bool:
    """``data.chat_template``: null means "when the tokenizer has one"; true requires one."""
    if setting is None:
        return has_chat_template(tokenizer)
    if setting and not has_chat_template(tokenizer):
        raise PromptFormatError(f"`data.chat_template` is true but the tokenizer of {model_path} has no chat "
                                f"template; set `data.chat_template: false` for a base model")
    return setting
