"""Optional model access over an OpenAI-compatible chat completions endpoint.

Configuration (environment wins over the secrets file):
  SPRITE_LLM_URL      full endpoint URL, e.g. https://api.openai.com/v1/chat/completions
  SPRITE_LLM_API_KEY  sent as "Authorization: Bearer <key>"
  SPRITE_LLM_MODEL    optional; omitted from the request when unset
  SPRITE_SECRETS_FILE optional KEY=VALUE file holding any of the above; it
                      must not be readable by group or others (chmod 600)

The API key is never logged or echoed: errors pass through redact().
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import httpx

CONFIG_KEYS = ("SPRITE_LLM_URL", "SPRITE_LLM_API_KEY", "SPRITE_LLM_MODEL")
NO_MODEL_MESSAGE = "no model is configured: set SPRITE_LLM_URL and SPRITE_LLM_API_KEY"
DEFAULT_TIMEOUT_S = 120.0
MAX_ERROR_BODY_CHARS = 300


class LLMConfigError(Exception):
    """The configuration exists but cannot be used (e.g. unsafe secrets file)."""


class LLMError(Exception):
    """The model call failed; the message is safe to show and log."""


@dataclass(frozen=True)
class LLMConfig:
    url: str
    api_key: str = field(repr=False)
    model: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "[redacted]") if self.api_key else text


def load_config(env: Mapping[str, str] | None = None) -> LLMConfig | None:
    """The model configuration, or None when no model is configured.

    Read on every use, so a secrets file dropped in later takes effect
    without restarting the server.
    """
    env = os.environ if env is None else env
    values: dict[str, str] = {}
    secrets_file = env.get("SPRITE_SECRETS_FILE", "").strip()
    if secrets_file:
        values.update(read_secrets_file(Path(secrets_file)))
    for key in CONFIG_KEYS:
        if env.get(key, "").strip():
            values[key] = env[key].strip()
    url, api_key = values.get("SPRITE_LLM_URL"), values.get("SPRITE_LLM_API_KEY")
    if not url or not api_key:
        return None
    if not url.startswith(("http://", "https://")):
        raise LLMConfigError("SPRITE_LLM_URL must start with http:// or https://")
    return LLMConfig(url=url, api_key=api_key, model=values.get("SPRITE_LLM_MODEL") or None)


def read_secrets_file(path: Path) -> dict[str, str]:
    """Parse a KEY=VALUE file (blank lines, # comments and `export ` allowed).

    A missing file counts as empty: the operator may point at it before the
    user has configured a model.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise LLMConfigError(f"cannot read secrets file {path}: {exc.strerror}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise LLMConfigError(
            f"secrets file {path} must not be accessible by group or others (chmod 600)"
        )
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep:
            continue  # not KEY=VALUE; skip rather than echo a possible secret
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


async def complete(
    config: LLMConfig, system: str, prompt: str, timeout_s: float | None = None
) -> str:
    """Send one chat completion and return the assistant's text."""
    body: dict = {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": prompt},
        ]
    }
    if config.model:
        body["model"] = config.model
    headers = {"Authorization": f"Bearer {config.api_key}"}
    timeout = timeout_s if timeout_s is not None else config.timeout_s
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.post(config.url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        detail = str(exc) or type(exc).__name__
        raise LLMError(config.redact(f"model endpoint unreachable: {detail}")) from None
    if response.status_code != 200:
        snippet = response.text[:MAX_ERROR_BODY_CHARS]
        raise LLMError(
            config.redact(f"model endpoint returned HTTP {response.status_code}: {snippet}")
        )
    return _answer_text(response)


def _answer_text(response: httpx.Response) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LLMError("model endpoint returned an unexpected response shape") from None
    if not isinstance(content, str):
        raise LLMError("model endpoint returned no text content")
    return content
