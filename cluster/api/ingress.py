"""The HTTP ingress: OpenAI's chat and completions endpoints, models, health and metrics.

Runs as an autoscaled Ray Serve deployment; tokenizer, chat template and validation happen
here, generation in the gateway deployment it holds a handle to.
"""

# No `from __future__ import annotations` here: Serve re-wraps the endpoint methods and
# FastAPI must see real annotations to recognise `request: Request`.
import asyncio
import json
import logging
import math
import time
from pathlib import Path

from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.image import ImageInputs, ImageSettings, expand_placeholders, preprocess
from expertmesh.ernie.tokenizer import load_tokenizer
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ServeArgs
from . import openai_protocol as op
from . import openai_responses as resp
from .images import ImageLimits, load_image
from .metrics import Metrics
from .multiplex import Choice, Mux, merged
from .ratelimit import load_keys

log = logging.getLogger(__name__)
# the docs need a key when keys are set, so they are endpoints of the ingress (below)
app = FastAPI(
    title="expertmesh",
    description="OpenAI-compatible ERNIE 4.5 MoE serving",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
# the chat page: plain files shipped in the package, served without a key (they hold no data;
# the page asks for a key when /v1/models answers 401) and with nothing from outside
STATIC = Path(__file__).parent / "static"
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}
HEALTH_TIMEOUT_S = 0.9  # /health answers within a second, whatever the gateway is doing
PARSE_IN_THREAD_BYTES = 256 * 1024  # bodies past this are parsed off the event loop


def retry_headers(e: op.APIError) -> dict | None:
    """Retry-After (whole seconds) and retry-after-ms on 429 and 503."""
    if e.status not in (429, 503):
        return None
    wait = getattr(e, "retry_after_s", 1.0)
    return {"Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(int(wait * 1e3))}


def too_many(message: str, retry_after_s: float, type: str | None = None, code=None):
    e = op.APIError(429, message, type, code=code)
    e.retry_after_s = retry_after_s
    return e


@app.exception_handler(op.APIError)
async def _api_error(request: Request, e: op.APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=retry_headers(e))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    msg = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    return JSONResponse(op.bad_request(msg).body(), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    msg = f"{request.method} {request.url.path}: {e.detail}"
    return JSONResponse(op.APIError(e.status_code, msg, kind).body(), status_code=e.status_code)


@app.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception):
    if isinstance(e, TaskCancelledError):  # the client went away; nobody reads this answer
        log.debug("%s: cancelled, the client went away", request.url.path)
        return Response(status_code=499)
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(
        op.APIError(500, f"internal error: {e}", "internal_error").body(), status_code=500
    )


def _parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise op.bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise op.bad_request("the request body is nested too deeply") from None


async def _json_body(request: Request, limit: int):
    """The parsed body; 413 past `limit` bytes, without reading more than that."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(int(length), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if len(raw) > PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(_parse_json, raw)
    return _parse_json(raw)


def _num_prompts(prompt) -> int:
    """Prompts in a completions `prompt`: a text or token ids are one, a list of them many."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def _too_large(size: int, limit: int) -> op.APIError:
    message = f"the request body is {size}+ bytes; this server takes at most {limit}"
    return op.APIError(413, message, "invalid_request_error", code="request_too_large")


def _page_file(name: str) -> FileResponse:
    if name not in PAGE_FILES:  # a fixed list: no path from the URL reaches the filesystem
        raise op.APIError(404, f"GET /static/{name}: no such file", "not_found_error")
    return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers=PAGE_HEADERS)


@serve.ingress(app)
class Ingress:
    def __init__(self, gateway, limiter, args: dict, model_path: str, model_name: str):
        self.gateway = gateway
        self.mux = Mux(gateway)
        self.args = ServeArgs.model_validate(args)
        self.keys = load_keys(self.args.api_keys, self.args.api_keys_file)
        limited = any(lim.rpm or lim.tpm for lim in self.keys.values())
        self.limiter = limiter if limited else None
        self.model_name = model_name
        self.names = {model_name, model_path, Path(model_path).name, ""}
        self.tokenizer = load_tokenizer(model_path)
        if self.tokenizer is None:
            raise ValueError(f"{model_path} has no tokenizer; the HTTP API needs one")
        self.model_cfg = ModelConfig.from_dir(model_path)
        self.image_settings = ImageSettings.from_dir(model_path)
        self.image_limits = ImageLimits(
            max_bytes=self.args.max_image_bytes,
            max_pixels=self.args.max_image_pixels,
            allow_remote=self.args.allow_remote_images,
            fetch_timeout_s=self.args.image_fetch_timeout_s,
        )
        self.max_model_len: int | None = None
        self.metrics = Metrics()
        self.created = int(time.time())

    # -- plumbing ---------------------------------------------------------------------------

    def _auth(self, request: Request) -> str | None:
        """The request's API key (None when the server has none); 401 if it is not one."""
        if not self.keys:
            return None
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if key not in self.keys:
            raise op.APIError(
                401, "missing or invalid API key", "authentication_error", code="invalid_api_key"
            )
        return key

    def _check_choices(self, num_prompts: int, n: int) -> int:
        if num_prompts * n > self.args.max_choices_per_request:
            raise op.bad_request(
                f"this request asks for {num_prompts * n} completions ({num_prompts} prompts "
                f"x n={n}); this server allows at most {self.args.max_choices_per_request}",
                param="n",
            )
        return num_prompts * n

    async def _admit(self, request: Request, prompts: list[list[int]], req) -> None:
        """Bound the work one request may create, before anything is submitted: 400 past the
        per-request limits, 429 past the key's rate limit or this replica's in-flight bound."""
        n = self._check_choices(len(prompts), req.n)
        ctx = await self._context()
        max_tokens = req.requested_max_tokens or self.args.default_max_tokens
        tokens = sum(len(p) + min(max_tokens, ctx - len(p)) for p in prompts) * req.n
        if tokens > self.args.max_request_tokens:
            raise op.bad_request(
                f"this request may use {tokens} tokens (prompts + max_tokens, times n); "
                f"this server allows at most {self.args.max_request_tokens} per request",
                param="max_tokens",
            )
        key = request.state.api_key
        if self.limiter is not None and key is not None:
            over = await self.limiter.acquire.remote(key, tokens)
            if over is not None:
                raise too_many(
                    f"rate limit reached for {over['limit']}: {over['per_minute']} per minute "
                    f"for this API key; retry in {over['retry_after_s']:.2f}s",
                    over["retry_after_s"],
                    type=over["limit"],
                    code="rate_limit_exceeded",
                )
        inflight = len(self.mux.queues)
        if inflight + n > self.args.max_inflight:
            raise too_many(
                f"the server is at capacity ({inflight} requests in flight); retry shortly",
                0.5,
            )

    def _check_model(self, model: str) -> None:
        if model not in self.names:
            raise op.model_not_found(model)

    async def _context(self) -> int:
        if self.max_model_len is None:
            info = await self.gateway.model_info.remote()
            self.max_model_len = info["max_model_len"]
        return self.max_model_len

    def _choices(
        self, prompt: list[int], req, n: int, index0: int = 0, images=None
    ) -> list[Choice]:
        eos = self.model_cfg.eos_token_ids
        return [
            Choice(
                self.gateway,
                self.mux,
                prompt,
                op.sampling_params(req, i, self.args.default_max_tokens),
                op.text_stream(req, self.tokenizer, eos),
                index0 + i,
                images,
            )
            for i in range(n)
        ]

    async def _images(self, req) -> ImageInputs | None:
        """The request's images, fetched or decoded, checked and preprocessed (VL models)."""
        parts = op.image_parts(req)
        if not parts:
            return None
        if len(parts) > self.args.max_images_per_request:
            raise op.bad_request(
                f"the request has {len(parts)} images; this server takes at most "
                f"{self.args.max_images_per_request}",
                param="messages",
            )
        loaded = await asyncio.gather(*(load_image(url, self.image_limits, p) for p, url in parts))
        try:
            return await asyncio.to_thread(preprocess, loaded, self.image_settings)
        except ValueError as e:  # e.g. an aspect ratio the processor cannot resize
            raise op.bad_request(f"an image cannot be processed: {e}", "messages") from None

    def _expanded(self, prompt: list[int], images: ImageInputs | None) -> list[int]:
        """The prompt with each image placeholder expanded to that image's tokens."""
        if images is None:
            return prompt
        counts = images.tokens_per_image(self.image_settings.merge_size)
        placeholder = self.model_cfg.vision.image_token_id
        if prompt.count(placeholder) != len(counts):
            raise op.bad_request(
                f"the chat template wrote {prompt.count(placeholder)} image placeholders for "
                f"{len(counts)} images",
                param="messages",
            )
        return expand_placeholders(prompt, placeholder, counts)

    async def _start(self, choices: list[Choice]) -> None:
        try:
            for c in choices:
                await c.start()
        except BaseException:
            for c in choices:
                c.cancel()
            raise

    def _observe(
        self, endpoint: str, status: int, t0: float, choices: list[Choice], prompt_tokens: int
    ):
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.prompt_tokens.inc(prompt_tokens)
        for c in choices:
            self.metrics.generation_tokens.inc(c.stream.num_tokens)
            if c.first_token_at is not None:
                self.metrics.ttft.observe(c.first_token_at - t0)
            for a, b in zip(c.token_times, c.token_times[1:]):
                self.metrics.itl.observe(b - a)

    async def _handle(self, endpoint: str, request: Request, run):
        t0 = time.monotonic()
        try:
            request.state.api_key = self._auth(request)
            return await run(t0)
        except op.APIError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            raise

    # -- endpoints --------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        """200 when the engine runs and every worker answers; else 503 with the reason, within
        a second (a gateway that is deploying or restarting does not answer in time)."""
        try:
            h = await asyncio.wait_for(self.gateway.health.remote(), HEALTH_TIMEOUT_S)
        except Exception as e:
            reason = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
            h = {"ready": False, "gateway": f"not answering ({reason}): starting or restarting"}
        if h["ready"]:
            return {"status": "ok", **h}
        down = [k for k in ("engine", "workers") if h.get(k) is False] or ["gateway"]
        e = op.APIError(503, f"not ready: {', '.join(down)} down: {h}", "service_unavailable")
        return JSONResponse(e.body(), status_code=503, headers=retry_headers(e))

    @app.get("/", include_in_schema=False)
    async def page(self):
        return _page_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def page_static(self, name: str):
        return _page_file(name)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        self._auth(request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        self._auth(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="expertmesh")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request):
        self._auth(request)
        return get_redoc_html(openapi_url="/openapi.json", title="expertmesh")

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        ctx = await self._context()
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "expertmesh",
            "max_model_len": ctx,
            # what the chat page (and any client) can ask of this model
            "capabilities": {"vision": self.model_cfg.is_vl, "routed_experts": True},
            "num_experts": self.model_cfg.num_experts,
            "top_k": self.model_cfg.top_k,
            "moe_layers": list(self.model_cfg.moe_layers),  # layer indices, in routed_experts order
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus(self, request: Request):
        self._auth(request)
        stats = await self.gateway.stats.remote()
        counts = await self.gateway.expert_counts.remote()
        return Response(self.metrics.render(stats, counts), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._handle("chat", request, lambda t0: self._chat(request, t0))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle("completions", request, lambda t0: self._completions(request, t0))

    # -- chat -------------------------------------------------------------------------------

    async def _chat(self, request: Request, t0: float):
        body = await _json_body(request, self.args.max_body_bytes)
        req = op.parse_chat_request(body, images=self.model_cfg.is_vl)
        self._check_model(req.model)
        images = await self._images(req)  # VL: checked and preprocessed, before tokenizing
        prompt = await asyncio.to_thread(op.chat_prompt_ids, req, self.tokenizer)
        expanded = self._expanded(prompt, images)  # what the engine computes and counts
        op.check_prompt(
            expanded,
            self.model_cfg.vocab_size,
            await self._context(),
            req.requested_max_tokens,
            param="messages",
        )
        await self._admit(request, [expanded], req)
        choices = self._choices(prompt, req, req.n, images=images)
        prompt = expanded  # usage counts image tokens
        await self._start(choices)
        header = resp.chat_header(self.model_name)
        if req.stream:
            chunks = self._chat_chunks(req, header, choices, len(prompt))
            return self._sse("chat", chunks, choices, len(prompt), t0)
        try:
            reasons = [await c.run_to_end() for c in choices]
        finally:  # a client gone mid-way cancels the handler: end its choices too
            self._end(choices)
            self._observe("chat", 200, t0, choices, len(prompt))
        out = [
            resp.chat_choice(req, c.index, c.stream, r, self.tokenizer)
            for c, r in zip(choices, reasons)
        ]
        return resp.chat_completion(header, out, self._usage(len(prompt), choices))

    async def _chat_chunks(self, req, header, choices: list[Choice], prompt_tokens: int):
        for c in choices:
            yield resp.chat_role_chunk(header, c.index)
        async for c, delta, reason in merged(choices):
            chunk = resp.chat_delta_chunk(header, req, c.index, delta, self.tokenizer)
            if chunk is not None:
                yield chunk
            if reason is not None:
                yield resp.chat_finish_chunk(header, c.index, reason)
        if req.include_usage:
            yield resp.chat_usage_chunk(header, self._usage(prompt_tokens, choices))

    # -- completions ------------------------------------------------------------------------

    async def _completions(self, request: Request, t0: float):
        req = op.parse_completion_request(await _json_body(request, self.args.max_body_bytes))
        self._check_model(req.model)
        self._check_choices(_num_prompts(req.prompt), req.n)  # before tokenizing them all
        prompts = await asyncio.to_thread(op.completion_prompts, req, self.tokenizer)
        ctx = await self._context()
        for p in prompts:
            op.check_prompt(p, self.model_cfg.vocab_size, ctx, req.requested_max_tokens)
        await self._admit(request, prompts, req)
        choices = [
            c
            for i, p in enumerate(prompts)
            for c in self._choices(p, req, req.n, op.completion_index(i, 0, req.n))
        ]
        await self._start(choices)
        prompt_tokens = sum(len(p) for p in prompts)
        header = resp.completion_header(self.model_name)
        if req.stream:
            chunks = self._completion_chunks(req, header, choices, prompt_tokens)
            return self._sse("completions", chunks, choices, prompt_tokens, t0)
        try:
            reasons = [await c.run_to_end() for c in choices]
        finally:  # a client gone mid-way cancels the handler: end its choices too
            self._end(choices)
            self._observe("completions", 200, t0, choices, prompt_tokens)
        out = [
            resp.completion_choice(req, c.index, c.stream, r, self.tokenizer)
            for c, r in zip(choices, reasons)
        ]
        return resp.completion_response(header, out, self._usage(prompt_tokens, choices))

    async def _completion_chunks(self, req, header, choices: list[Choice], prompt_tokens: int):
        async for c, delta, reason in merged(choices):
            chunk = resp.completion_chunk(header, req, c.index, delta, self.tokenizer, reason)
            if chunk is not None:
                yield chunk
        if req.include_usage:
            yield resp.completion_usage_chunk(header, self._usage(prompt_tokens, choices))

    def _sse(self, endpoint: str, chunks, choices: list[Choice], prompt_tokens: int, t0: float):
        """Server-sent events of `chunks`, then [DONE]; a mid-stream error becomes an error event
        (the status line is already sent); a closed stream cancels every choice."""

        async def events():
            try:
                async for chunk in chunks:
                    yield resp.sse(chunk)
            except op.APIError as e:
                yield resp.sse(e.body())
            finally:
                self._end(choices)
                self._observe(endpoint, 200, t0, choices, prompt_tokens)
            yield resp.SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    @staticmethod
    def _end(choices: list[Choice]) -> None:
        for c in choices:
            c.cancel()  # aborts only those still running

    def _usage(self, prompt_tokens: int, choices: list[Choice]) -> dict:
        completion_tokens = sum(c.stream.num_tokens for c in choices)
        return resp.usage(prompt_tokens, completion_tokens, self.model_cfg)
