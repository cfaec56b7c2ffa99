"""`expertmesh chat`: a terminal chat client for any OpenAI-compatible server.

It keeps the conversation (system prompt first), sends all of it on every turn and streams the
reply as it arrives. Plain text on stdout, so it also works piped (`echo hi | expertmesh chat`).
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from pydantic import BaseModel, Field, field_validator

HELP = "/reset clears the history, /exit (or Ctrl-D) quits, /help shows this"
START_HINT = (
    "start a server with `expertmesh serve --model DIR`, or deploy deploy/serve_config.yaml "
    "on a Ray cluster (`serve deploy deploy/serve_config.yaml`), then pass its address as --url"
)


class ChatArgs(BaseModel):
    url: str = Field(
        "http://127.0.0.1:8000", description="server address; the OpenAI API is under /v1"
    )
    api_key: str | None = Field(
        None, validate_default=True, description="API key; default: $OPENAI_API_KEY"
    )
    model: str | None = Field(None, description="model id; default: the first one of /v1/models")
    system: str | None = Field(None, description="system prompt, first in the conversation")
    temperature: float = Field(0.7, ge=0, le=2, description="sampling temperature")
    max_tokens: int = Field(256, ge=1, description="tokens per reply at most")

    @field_validator("api_key")
    @classmethod
    def _key_from_env(cls, v: str | None) -> str | None:
        return v if v is not None else (os.environ.get("OPENAI_API_KEY") or None)


def api_base(url: str) -> str:
    """The client's base_url: `url` + /v1 (a url that already ends in /v1 is taken as is)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def error_line(e: Exception, url: str) -> str:
    """One line for an API error: the HTTP status and the server's own message."""
    import openai

    if isinstance(e, openai.APIConnectionError):  # also timeouts
        detail = _one_line(str(e.__cause__ or "")) or e.message
        return f"error: cannot reach {url} ({detail}); {START_HINT}"
    if isinstance(e, openai.APIStatusError):
        return f"error: {e.status_code} {_server_message(e)}"
    if isinstance(e, openai.APIError):  # an error event inside a stream
        return f"error: {_one_line(e.message)}"
    return f"error: {type(e).__name__}: {_one_line(str(e))}"


def _server_message(e) -> str:
    body = e.body  # the OpenAI error object ({"message", "type", "code"}) when the server sent one
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            if body.get(key):
                return _one_line(str(body[key]))
    text = e.response.text if body is None else str(body)
    return _one_line(text) or e.response.reason_phrase or "(no message)"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Session:
    def __init__(self, client, url, model, system, temperature, max_tokens, out: TextIO):
        self.client, self.url, self.model, self.out = client, url, model, out
        self.system, self.temperature, self.max_tokens = system, temperature, max_tokens
        self.history: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def turn(self, user: str) -> None:
        """Send the conversation plus `user`; stream the reply; keep both only if it succeeded."""
        messages = self.history + [{"role": "user", "content": user}]
        reply: list[str] = []
        stream = None
        try:
            stream = self.client.chat.completions.create(
                model=self.model,
                messages=messages,
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                stream=True,
            )
            for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    reply.append(delta)
                    self.say(delta, end="")
        except KeyboardInterrupt:  # stop this reply; keep what was shown of it
            if stream is not None:
                stream.close()
            self.say(" [interrupted]")
            if not reply:
                return
        except Exception as e:  # openai.APIError and friends: report and go on
            if reply:
                self.say()
            self.say(error_line(e, self.url))
            return
        else:
            self.say()
        self.history = messages + [{"role": "assistant", "content": "".join(reply)}]


def _first_model(client, url: str, out: TextIO) -> str | None:
    try:
        models = client.models.list().data
    except Exception as e:
        out.write(error_line(e, url) + "\n")
        return None
    if not models:
        out.write(f"error: {url} serves no models\n")
        return None
    return models[0].id


def _read_line(stdin: TextIO, tty: bool) -> str | None:
    """The next line without its newline; None at end of input."""
    if tty:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def run_chat(
    url: str = "http://127.0.0.1:8000",
    api_key: str | None = None,
    model: str | None = None,
    system: str | None = None,
    temperature: float = 0.7,
    max_tokens: int = 256,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Chat with the server at `url` until /exit or end of input. Returns the exit status."""
    from openai import OpenAI

    stdin = sys.stdin if stdin is None else stdin
    out = sys.stdout if stdout is None else stdout
    tty = stdin is sys.stdin and stdin.isatty()
    client = OpenAI(base_url=api_base(url), api_key=api_key or "none", max_retries=0)
    model = model or _first_model(client, url, out)
    if model is None:
        return 1
    if tty:
        out.write(f"{model} at {url}; {HELP}\n")
    session = _Session(client, url, model, system, temperature, max_tokens, out)
    while True:
        try:
            line = _read_line(stdin, tty)
        except KeyboardInterrupt:
            out.write("\n")
            return 130
        command = None if line is None else line.strip()
        if command is None or command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            session.say("(history cleared)")
        elif command == "/help":
            session.say(HELP)
        elif command:
            session.turn(line)
