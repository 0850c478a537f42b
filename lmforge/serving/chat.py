"""Chat templates: OpenAI `messages` -> the prompt text a model continues.

A model directory may carry its own template (Jinja) as transformers writes it: `chat_template` in
`tokenizer_config.json`, or a `chat_template.jinja` file. It is rendered as transformers renders it (sandboxed
Jinja, `messages`, `add_generation_prompt=True`, `bos_token`, `eos_token`, `raise_exception`). A base model
without one (a GPT-2-style model trained on plain text) gets `DEFAULT_CHAT_TEMPLATE`: each message as
"Role: text" and a blank line, ending with "Assistant:"; generation then stops before a next "User:" line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
#: stop strings added to a chat that uses the default template (the model would write the user's next turn)
DEFAULT_CHAT_STOP = ["\nUser:", "\nSystem:"]


def read_chat_template(directory: Path) -> str | None:
    """The model directory's own chat template, if it has one."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTemplate:
    """A compiled template; `render(messages)` gives the prompt text."""

    def __init__(self, source: str | None, bos_token: str | None = None, eos_token: str | None = None) -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.is_default = source is None
        self.source = source or DEFAULT_CHAT_TEMPLATE  # the Jinja text (GET /tokenizer_info hands it out)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source or DEFAULT_CHAT_TEMPLATE)
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""

    def render(self, messages: list[dict[str, Any]]) -> str:
        """messages: [{"role", "content"}] -> the prompt, ready for the assistant's reply."""
        return self._template.render(
            messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
        )
