"""OpenAI's HTTP formats for /v1/chat/completions and /v1/completions, as pure functions.

Requests are pydantic models (strict types, unknown fields ignored); responses and stream
chunks are plain dicts in the shapes the official `openai` client parses. No Ray, no FastAPI:
the Serve app calls these and moves the bytes.

Decisions: fields the engine has no use for are accepted only with their neutral value, so that
none is silently ignored: completions' `suffix` (empty) and `best_of` (n), chat's
`tools` / `functions` (none, or with `tool_choice` "none");
image parts are refused (text models), the `developer`
role renders as `system` (ERNIE's template knows no other), stop strings must be non-empty.
Text (message contents, text prompts, stop strings) must be valid Unicode: a lone surrogate
(JSON allows `"\\udfff"`) is a 400 naming the field. User text is encoded as text: a
special-token string in a message or a text prompt is its characters, never the special token
(see `expertmesh.ernie.tokenizer`); only the chat template writes special tokens.
Usage and logprobs agree: `completion_tokens` counts every token generated for the returned
choice, the EOS that ended it and the tokens of a stop string included, and each of them has
a logprob entry (an EOS entry names the token, with no bytes: the text leaves it out).
Sampling: OpenAI's `presence_penalty`, `frequency_penalty` and `logit_bias` (token ids as
strings, checked against the vocabulary), and vLLM's `repetition_penalty`, `min_p` and
`min_tokens` (no stop token, and as in vLLM no stop string ending within them, before that many
tokens; at most max_tokens, and an unset max_tokens defaults to at least it); the math is in
`expertmesh.router.sampling`. Logprobs stay those of the model's raw distribution.
Structured output: chat's `response_format` `json_object` or `json_schema` (its `schema`,
checked by `check_structured`, off the event loop) constrains the answer
(`expertmesh.router.structured`).
Completions' `echo`: each choice's text starts with its prompt (a token-id prompt decoded), and
with `logprobs` its entries start with the prompt's tokens (the first has no logprob), as
OpenAI's legacy endpoint and vLLM answer (what lm-evaluation-harness scores prompts with);
with `max_tokens: 0` that is all (the engine computes one token, which is dropped).
Extensions: vLLM's `top_k`, `ignore_eos` and `stop_token_ids` (ids that end the choice like EOS:
the text leaves them out, finish_reason "stop"); vLLM's `return_token_ids` (`token_ids` per
choice, one per counted token; `prompt_token_ids`: per choice for completions, on the response
for chat; in a stream, on the first chunk); `return_routed_experts` on requests;
`routed_experts` per choice ([tokens][moe layers][k], one per counted token, like logprobs) and
`active_params_per_token` / `flops` in `usage`.
A checkpoint without a tokenizer is served on token ids alone (`check_without_tokenizer`):
completions whose prompts are token ids, answered with `token_ids` and an empty text; chat,
text prompts and stop strings are a 400.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from expertmesh.ernie.tokenizer import chat_prompt_ids as render_chat
from expertmesh.ernie.tokenizer import encode_text
from expertmesh.router.events import ErrorKind, TokenEvent
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.structured import (
    JSON_OBJECT,
    StructuredOutputError,
    check_spec,
    schema_spec,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .textstream import TextStream

MAX_LOGIT_BIAS = 1024  # logit_bias entries per request (each step of it adds them up)
DEFAULT_MAX_TOKENS = 4096  # chat output limit when a request names none (the engine clamps it)
MAX_STOP_STRINGS = 4
MIN_LOGPROB = -9999.0  # what OpenAI reports for impossible tokens (JSON has no -inf)

# -- errors -----------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered as OpenAI does: HTTP `status` and `{"error": {...}}`."""

    def __init__(self, status: int, message: str, type: str | None = None, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        default = "internal_error" if status >= 500 else "invalid_request_error"
        self.type = type or ERROR_TYPES.get(status, default)

    def body(self) -> dict:
        return {
            "error": {
                "message": _printable(self.message),
                "type": self.type,
                "param": _printable(self.param),
                "code": self.code,
            }
        }


def _printable(s):
    """`s` with lone surrogates (from the request's JSON) escaped, so the body encodes as UTF-8."""
    if not isinstance(s, str) or s.isascii():
        return s
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def unicode_error(text: str) -> str | None:
    """Why `text` is not valid Unicode (a lone surrogate: no tokenizer encodes one), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"must be valid Unicode text; it holds a lone surrogate "
            f"({_printable(text[e.start])}) at index {e.start}"
        )
    return None


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
    )


STATUS_OF_KIND = {
    ErrorKind.INVALID: 400,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
}


def error_for_event(ev: TokenEvent) -> APIError:
    """The APIError for an engine event that ended in error: its kind decides the status."""
    message = ev.error or f"the request ended: {ev.finish_reason}"
    status = STATUS_OF_KIND.get(ev.error_kind, 500)
    code = "service_unavailable" if status == 503 else None
    return APIError(status, message, code=code)


class FieldError(ValueError):
    """Raised in a model validator for a rule about one field; the 400 names `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


def validation_error_to_api_error(exc: ValidationError) -> APIError:
    """A 400 naming the first offending field (param = its dotted location)."""
    err = exc.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    loc = [str(x) for x in err["loc"]]
    if isinstance(cause, FieldError):
        loc, msg = [*loc, cause.param], cause.message
    else:
        msg = str(cause) if isinstance(cause, ValueError) else err["msg"]
    param = ".".join(loc) or None
    return bad_request(f"{param}: {msg}" if param else msg, param)


# -- requests ---------------------------------------------------------------------------------


def _only_neutral(v, info: ValidationInfo):
    """A field the engine has no use for passes only empty, 0 or false."""
    if v:
        raise ValueError(f"{info.field_name} is not supported")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = Field(False, description="send a last chunk with the usage")


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str = Field("", description="the served model's name")
    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(
        1.0, description="sampling temperature; 0 is greedy"
    )
    top_p: Annotated[float, Field(gt=0, le=1)] | None = Field(
        1.0, description="nucleus sampling: keep the most likely tokens holding this much"
    )
    n: Annotated[int, Field(ge=1, le=16)] | None = Field(1, description="choices to generate")
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = Field(
        None, description="the same seed gives the same tokens; choice i uses seed + i"
    )
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the text")
    stream: bool | None = Field(False, description="answer with server-sent events")
    stream_options: StreamOptions | None = Field(None, description="options of the stream")
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = Field(
        0.0, description="subtracted from the logit of every token already in the output"
    )
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = Field(
        0.0, description="subtracted from a token's logit once per time it is in the output"
    )
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS)
        ]
        | None
    ) = Field(None, description="token id (a string) -> added to its logit, -100 to 100")
    user: str | None = Field(None, description="the end user, for logs")
    return_routed_experts: bool | None = Field(
        False, description="extension: report each token's experts in every MoE layer"
    )
    top_k: Annotated[int, Field(ge=-1)] | None = Field(
        None, description="extension (as vLLM): sample from the k most likely tokens; -1 or 0: all"
    )
    ignore_eos: bool | None = Field(
        False, description="extension (as vLLM): keep generating past the model's EOS tokens"
    )
    stop_token_ids: list[int] | None = Field(
        None, description="extension (as vLLM): token ids that end the choice, as EOS does"
    )
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        1.0, description="extension (as vLLM): > 1 discourages tokens of the prompt and output"
    )
    min_p: Annotated[float, Field(ge=0, le=1)] | None = Field(
        0.0, description="extension (as vLLM): drop tokens less likely than min_p x the top one"
    )
    min_tokens: Annotated[int, Field(ge=0)] | None = Field(
        0, description="extension (as vLLM): no stop token or stop string before this many"
    )
    return_token_ids: bool | None = Field(
        False,
        description="extension (as vLLM): the answer carries its token ids (`token_ids`, per "
        "chunk when streaming) and the prompt's (`prompt_token_ids`, in the first chunk)",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if not (isinstance(stops, list) and len(stops) <= MAX_STOP_STRINGS) or not all(
            isinstance(s, str) and s for s in stops
        ):
            raise ValueError(f"must be a non-empty string or a list of up to {MAX_STOP_STRINGS}")
        for s in stops:
            if err := unicode_error(s):
                raise ValueError(err)
        return v

    @field_validator("n")
    @classmethod
    def _n_null_is_one(cls, v):
        return 1 if v is None else v  # JSON null means the default, as everywhere in the API

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v):
        for key in v or {}:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers), not {key!r}")
        return v

    @model_validator(mode="after")
    def _min_tokens_within_max(self):
        most = self.requested_max_tokens
        if self.min_tokens and most is not None and self.min_tokens > most:
            raise FieldError("min_tokens", f"must be at most max_tokens ({most})")
        return self

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ImageURL(_Strict):
    url: str = Field(description="a data:image/...;base64 URL (or http(s), where allowed)")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted, unused")


class ContentPart(_Strict):
    type: str = Field("text", description="'text', or 'image_url' for a model that takes images")
    text: str | None = Field(None, description="the text of a text part")
    image_url: ImageURL | None = Field(None, description="the image of an image_url part")

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string(cls, v):
        return {"url": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo):
        if self.type == "image_url":
            if not (info.context or {}).get("images"):
                raise ValueError("this model takes text only; image parts are not supported")
            if self.image_url is None:
                raise FieldError("image_url", "an image_url part needs 'image_url': {'url': ...}")
            return self
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported")
        if self.text is None:
            raise FieldError("text", "a text part needs 'text'")
        if err := unicode_error(self.text):
            raise FieldError("text", err)
        return self


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        "user", description="who speaks"
    )
    content: list[ContentPart] = Field(
        default_factory=list, description="a string or a list of text parts"
    )
    name: str | None = Field(None, description="the speaker's name (not rendered)")

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            if err := unicode_error(v):
                raise ValueError(err)
            return [{"type": "text", "text": v}]
        if isinstance(v, list):
            return v
        raise ValueError("must be a string or a list of content parts")

    @property
    def text(self) -> str:
        return "".join(p.text or "" for p in self.content)

    @property
    def has_images(self) -> bool:
        return any(p.type == "image_url" for p in self.content)

    def template_content(self) -> str | list[dict]:
        """What the chat template gets: the text, or (with images) the parts in order, an
        image as {"type": "image"} (the template writes its placeholder tokens)."""
        if not self.has_images:
            return self.text
        return [
            {"type": "image"} if p.type == "image_url" else {"type": "text", "text": p.text}
            for p in self.content
        ]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(default_factory=list, description="the conversation")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="output limit (deprecated name)"
    )
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="output limit; wins over max_tokens"
    )
    logprobs: bool | None = Field(False, description="return the chosen tokens' logprobs")
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        None, description="also the most likely tokens at each step; needs logprobs"
    )
    response_format: dict[str, Any] | None = Field(
        None, description="{'type': 'text' | 'json_object' | 'json_schema', 'json_schema': ...}"
    )
    tools: list[Any] | None = Field(None, description="not supported: none, or tool_choice none")
    functions: list[Any] | None = Field(None, description="not supported: as tools")
    tool_choice: Any = Field(None, description="only 'none' where tools are given")

    @model_validator(mode="after")
    def _checks(self):
        if not self.messages:
            raise FieldError("messages", "must hold at least one message")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "needs logprobs to be true")
        if self.structured_spec is not None and self.min_tokens:
            raise FieldError("min_tokens", "cannot be combined with a JSON response_format")
        for name in ("tools", "functions"):
            if getattr(self, name) and self.tool_choice != "none":
                raise FieldError(
                    name, "tool calling is not supported (unless tool_choice is 'none')"
                )
        return self

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        if v is None:
            return v
        kind = v.get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', not {kind!r}")
        if kind == "json_schema":
            inner = v.get("json_schema")
            if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
                raise FieldError("json_schema", "needs {'name': ..., 'schema': {...}}")
        return v  # the schema itself: `check_structured` (it takes a while: off the event loop)

    @property
    def structured_spec(self) -> str | None:
        """The grammar spec of `response_format` (`router.structured`), None for text."""
        return _structured_spec(self.response_format)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def _structured_spec(response_format: dict | None) -> str | None:
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return JSON_OBJECT
    if kind == "json_schema":
        return schema_spec(response_format["json_schema"]["schema"])
    return None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        "", validate_default=True, description="text, texts, token ids, or lists of token ids"
    )
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        16, description="output limit; 0 only with echo (the prompt scored, nothing generated)"
    )
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = Field(
        None, description="return the chosen tokens' logprobs and this many alternatives"
    )
    echo: bool | None = Field(
        False, description="the text starts with the prompt; logprobs cover the prompt too"
    )
    suffix: str | None = Field(None, description="not supported: only empty")
    best_of: int | None = Field(None, description="not supported: only n")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        _check_prompt_shape(v)
        return v

    # a name of its own: `_unsupported` would replace _Sampling's validator
    _unsupported_completions = field_validator("suffix")(_only_neutral)

    @model_validator(mode="after")
    def _zero_only_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "must be at least 1 (0 only with echo)")
        return self

    @property
    def scores_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs), no answer."""
        return bool(self.echo) and self.max_tokens == 0

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise FieldError("best_of", "only best_of equal to n is supported")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """max_tokens when the client set it (the default of 16 is not checked against context)."""
        return self.max_tokens if "max_tokens" in self.model_fields_set else None


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_prompt_shape(v) -> None:
    if isinstance(v, str):
        if not v:
            raise ValueError("the prompt is empty")
        if err := unicode_error(v):
            raise ValueError(err)
        return
    if not isinstance(v, list) or not v:
        raise ValueError(
            "must be a non-empty string, list of strings, list of token ids, or list of lists"
        )
    if all(isinstance(x, str) for x in v):
        if not all(v):
            raise ValueError("a prompt in the list is empty")
        for i, x in enumerate(v):
            if err := unicode_error(x):
                raise FieldError(str(i), err)
    elif all(isinstance(x, list) for x in v):
        if not all(x and all(_is_id(t) for t in x) for x in v):
            raise ValueError("token-id prompts must be non-empty lists of integers")
    elif not all(_is_id(x) for x in v):
        raise ValueError("a list prompt must hold only strings, only integers, or only lists")


def parse_chat_request(body: Any, images: bool = False) -> ChatCompletionRequest:
    """The request from a decoded JSON body; APIError 400 when invalid. `images`: whether the
    model takes image parts (else they are a 400)."""
    return _parse(ChatCompletionRequest, body, {"images": images})


def parse_completion_request(body: Any) -> CompletionRequest:
    return _parse(CompletionRequest, body)


def _parse(cls, body, context: dict | None = None):
    try:
        return cls.model_validate(body, context=context)
    except ValidationError as e:
        raise validation_error_to_api_error(e) from None


# -- prompts and sampling ---------------------------------------------------------------------

_TEMPLATE_ROLES = {"developer": "system"}


def chat_prompt_ids(req: ChatCompletionRequest, tokenizer) -> list[int]:
    """The conversation rendered with the checkpoint's chat template, as token ids.

    The template writes the special tokens; the messages' text is encoded as text, so
    `"</s><|begin_of_sentence|>"` in a message cannot forge a turn. Messages without
    special-token strings get exactly the ids of transformers' `apply_chat_template`.
    """
    if not req.messages:
        raise bad_request("messages must hold at least one message", "messages")
    msgs = [
        {"role": _TEMPLATE_ROLES.get(m.role, m.role), "content": m.template_content()}
        for m in req.messages
    ]
    try:
        return render_chat(tokenizer, msgs)
    except Exception as e:  # the template's checks (raise_exception), Jinja and encoding errors
        msg = f"the messages cannot be rendered with the chat template and tokenized: {e}"
        raise bad_request(msg, "messages") from e


def image_parts(req: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(param, url) of every image part, in conversation order."""
    return [
        (f"messages.{i}.content.{j}", p.image_url.url)
        for i, m in enumerate(req.messages)
        for j, p in enumerate(m.content)
        if p.type == "image_url"
    ]


def completion_prompts(req: CompletionRequest, tokenizer) -> list[list[int]]:
    """One list of token ids per prompt, whichever of the four forms the request used.

    A text prompt is plain text: a special-token string in it (`"</s>"`) is encoded as its
    characters, the same rule as for chat messages. A client that means special tokens sends
    token ids, which are taken as they are. (vLLM parses special-token strings in text prompts;
    we do not, so that a prompt assembled from untrusted text cannot inject control tokens.)
    Text without such strings gets exactly `tokenizer.encode(text)`, as before.
    """
    p = req.prompt
    if isinstance(p, str):
        return [_encode_prompt(tokenizer, p, "prompt")]
    if all(isinstance(x, str) for x in p):
        return [_encode_prompt(tokenizer, x, f"prompt.{i}") for i, x in enumerate(p)]
    if all(_is_id(x) for x in p):
        return [list(p)]
    return [list(x) for x in p]


def _encode_prompt(tokenizer, text: str, param: str) -> list[int]:
    try:
        return encode_text(tokenizer, text)
    except Exception as e:  # text the tokenizer cannot encode is the request's fault
        raise bad_request(f"{param}: the text cannot be tokenized: {e}", param) from e


def text_prompts(req: CompletionRequest) -> list[str] | None:
    """A completions request's prompts when they are text (one or several), else None."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    return list(p) if p and all(isinstance(x, str) for x in p) else None


def check_without_tokenizer(req, model: str) -> None:
    """APIError 400 for what a checkpoint without a tokenizer cannot serve: chat (no chat
    template), text prompts and stop strings (no text to encode or to search)."""
    why = f"the model {model!r} has no tokenizer"
    if isinstance(req, ChatCompletionRequest):
        raise bad_request(
            f"{why}, hence no chat template: send token ids as the prompt of /v1/completions",
            "messages",
        )
    if text_prompts(req) is not None:
        raise bad_request(f"{why}: the prompt must be token ids", "prompt")
    if req.stop_list:
        raise bad_request(f"{why}: stop strings cannot be matched; use stop_token_ids", "stop")


def check_structured(req) -> None:
    """APIError 400 if a chat request's JSON schema has no grammar (tens of ms for a big one:
    call it off the event loop)."""
    spec = req.structured_spec if isinstance(req, ChatCompletionRequest) else None
    if spec is None:
        return
    try:
        check_spec(spec)
    except StructuredOutputError as e:
        raise bad_request(f"response_format: {e}", "response_format") from None


def check_logit_bias(req, vocab_size: int) -> None:
    """APIError 400 for a logit_bias token id outside the vocabulary."""
    bad = [t for t in map(int, req.logit_bias or {}) if t >= vocab_size]
    if bad:
        raise bad_request(
            f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
            "logit_bias",
        )


def check_prompt(
    ids: list[int],
    vocab_size: int,
    max_model_len: int,
    max_tokens: int | None = None,
    param: str = "prompt",
) -> None:
    """APIError 400 for ids outside the vocabulary or a prompt (+ max_tokens) past the context."""
    what = "messages" if param == "messages" else "prompt"
    if not ids:
        raise bad_request(f"the {what} is empty", param)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(
            f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", param
        )
    head = f"This model's maximum context length is {max_model_len} tokens. However, "
    if len(ids) >= max_model_len:
        raise bad_request(
            head + f"your {what} has {len(ids)} tokens, leaving no room for the completion. "
            f"Please reduce the length of the {what}.",
            param,
            "context_length_exceeded",
        )
    if max_tokens is not None and len(ids) + max_tokens > max_model_len:
        raise bad_request(
            head + f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the {what}, "
            f"{max_tokens} in the completion). Please reduce the length of the {what} "
            "or completion.",
            param,
            "context_length_exceeded",
        )


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    choice_index: int = 0,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> SamplingParams:
    """The engine's parameters for choice `choice_index` of `req` (stop strings: TextStream)."""
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.requested_max_tokens or default_max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens = 1 if req.scores_only else (req.max_tokens or default_max_tokens)
        logprobs = req.logprobs
    max_tokens = max(max_tokens, req.min_tokens or 0)  # a default below min_tokens gives way
    seed = None
    if req.seed is not None:
        seed = req.seed + choice_index
        seed = seed - 2**64 if seed >= 2**64 else seed
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=seed,
        logprobs=logprobs,
        return_routed_experts=bool(req.return_routed_experts),
        top_k=req.top_k or 0,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=bool(req.ignore_eos),
        min_p=req.min_p or 0.0,
        min_tokens=req.min_tokens or 0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=tuple((int(t), b) for t, b in (req.logit_bias or {}).items()),
        structured=req.structured_spec if isinstance(req, ChatCompletionRequest) else None,
        prompt_logprobs=logprobs if getattr(req, "echo", False) else None,
    )


def text_stream(req, tokenizer, stop_token_ids: Iterable[int] = ()) -> TextStream:
    """A TextStream for one choice of `req`; pass the model's EOS ids as stop_token_ids.

    With `ignore_eos` the engine goes on past EOS, so an EOS is an ordinary token of the
    answer (it decodes to no text) rather than the stop token that ends it. The request's own
    `stop_token_ids` end it either way, without their text.
    """
    stops = {*(req.stop_token_ids or ()), *(() if req.ignore_eos else stop_token_ids)}
    return TextStream(tokenizer, req.stop_list, stops, min_tokens=req.min_tokens or 0)


def finish_reason(engine_reason: str | None, stream: TextStream) -> str | None:
    """OpenAI's finish_reason: a stop string hit is "stop"; the engine's stop/length as they are."""
    return "stop" if stream.stopped else engine_reason


def echo_texts(req: CompletionRequest, prompts: list[list[int]], tokenizer) -> list[str]:
    """What `echo` puts before each prompt's choices: a text prompt as sent, a token-id prompt
    decoded (empty without a tokenizer)."""
    texts = text_prompts(req)
    if texts is not None:
        return texts
    if tokenizer is None:
        return ["" for _ in prompts]
    return [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]


def completion_index(prompt_index: int, choice_index: int, n: int) -> int:
    """OpenAI numbers the choices of several prompts prompt by prompt."""
    return prompt_index * n + choice_index
