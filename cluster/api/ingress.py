"""The HTTP ingress: OpenAI's chat and completions endpoints, models, health and metrics.

Runs as an autoscaled Ray Serve deployment; tokenizer, chat template and validation happen
here, generation in the gateway deployment it holds a handle to.
"""

# No `from __future__ import annotations` here: Serve re-wraps the endpoint methods and
# FastAPI must see real annotations to recognise `request: Request`.
import asyncio
import logging
import time
from pathlib import Path

from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.tokenizer import load_tokenizer
from fastapi import Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from ..config import ServeArgs
from . import openai_protocol as op
from . import openai_responses as resp
from .admission import Admission
from .http_app import app, json_body, num_prompts, page_file, retry_headers
from .images import RequestImages
from .metrics import Metrics
from .multiplex import Choice, GatewayMux, detached, merged
from .ratelimit import load_keys
from .routing import known_replicas
from .textstream import Delta

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 0.9  # /health answers within a second, whatever the gateway is doing


@serve.ingress(app)
class Ingress:
    def __init__(self, gateway, pool, limiter, args: dict, model_path: str, model_name: str):
        self.gateway, self.pool = gateway, pool  # pool: the shared expert workers, if any
        self.args = ServeArgs.model_validate(args)
        self.mux = GatewayMux(gateway, self.args.gateway_timeout_s)
        self.keys = load_keys(self.args.api_keys, self.args.api_keys_file)
        limited = any(lim.rpm or lim.tpm for lim in self.keys.values())
        self.admission = Admission(self.args, limiter if limited else None)
        self.model_name = model_name
        self.names = {model_name, model_path, Path(model_path).name, ""}
        self.tokenizer = load_tokenizer(model_path)
        if self.tokenizer is None:  # served on token ids alone (see openai_protocol)
            log.warning("%s has no tokenizer: completions of token-id prompts only", model_path)
        self.model_cfg = ModelConfig.from_dir(model_path)
        self.images = RequestImages(self.args, model_path, self.model_cfg)
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

    async def _admit(self, request: Request, prompts: list[list[int]], req) -> None:
        context = await self._context()
        inflight = len(self.mux.queues)
        await self.admission.admit(request.state.api_key, prompts, req, context, inflight)

    def _check_model(self, model: str) -> None:
        if model not in self.names:
            raise op.model_not_found(model)

    async def _model_info(self) -> dict:
        return await self.gateway.model_info.remote()

    async def _context(self) -> int:
        if self.max_model_len is None:
            info = await detached(self._model_info())
            self.max_model_len = info["max_model_len"]
        return self.max_model_len

    def _choices(
        self, prompt: list[int], req, n: int, index0: int = 0, images=None
    ) -> list[Choice]:
        eos = self.model_cfg.eos_token_ids
        return [
            Choice(
                self.mux,
                prompt,
                op.sampling_params(req, i, self.args.default_max_tokens),
                op.text_stream(req, self.tokenizer, eos),
                index0 + i,
                images,
            )
            for i in range(n)
        ]

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
        """200 when some gateway can serve (its engine runs, every worker answers); else 503
        with the reason; within a second either way (a gateway that is deploying or
        restarting does not answer in time). Reports each gateway and each worker."""
        h = await self._health()
        if h["ready"]:
            return {"status": "ok", **h}
        down = [k for k in ("engine", "workers") if h.get(k) is False] or ["gateway"]
        e = op.APIError(503, f"not ready: {', '.join(down)} down: {h}", "service_unavailable")
        return JSONResponse(e.body(), status_code=503, headers=retry_headers(e))

    async def _health(self) -> dict:
        async def gateway(replica: str | None) -> dict:
            handle = self.gateway if replica is None else self.gateway.options(session_id=replica)
            try:
                h = await asyncio.wait_for(handle.health.remote(), HEALTH_TIMEOUT_S)
                return {"replica": replica, **h}
            except Exception as e:
                reason = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
                return {"replica": replica, "ready": False, "error": f"not answering ({reason})"}

        async def workers() -> dict | None:
            if self.pool is None:
                return None
            try:
                return await asyncio.wait_for(self.pool.health.remote(), HEALTH_TIMEOUT_S)
            except Exception as e:
                return {"strategy": None, "workers": [], "error": type(e).__name__}

        replicas = sorted(known_replicas()) or [None]  # None: whichever answers (at start)
        gateways = await asyncio.gather(*(detached(gateway(r)) for r in replicas))
        pool = await detached(workers())
        ready = [g for g in gateways if g["ready"]]
        best = ready[0] if ready else next((g for g in gateways if "engine" in g), {})
        h = {
            "ready": bool(ready),
            "engine": best.get("engine", False),
            "workers": best.get("workers", False),
            "strategy": pool["strategy"] if pool else best.get("strategy"),
            "gateways": list(gateways),
        }
        if pool is not None:
            h["expert_workers"] = pool["workers"]
        if not gateways or all("engine" not in g for g in gateways):
            h["gateway"] = "not answering: starting or restarting"
        return h

    @app.get("/", include_in_schema=False)
    async def page(self):
        return page_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def page_static(self, name: str):
        return page_file(name)

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
        return {"object": "list", "data": [await self._card()]}

    @app.get("/v1/models/{model:path}")
    async def model(self, request: Request, model: str):
        """OpenAI's "retrieve model" (`client.models.retrieve`): the card, or 404."""
        self._auth(request)
        if not model or model not in self.names:  # the served name, or the checkpoint's path
            raise op.model_not_found(model)
        return await self._card()

    async def _card(self) -> dict:
        ctx = await self._context()
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "expertmesh",
            "max_model_len": ctx,
            # what the chat page (and any client) can ask of this model
            "capabilities": {
                "vision": self.model_cfg.is_vl,
                "routed_experts": True,
                "chat": self.tokenizer is not None,  # no tokenizer: token-id completions only
            },
            "num_experts": self.model_cfg.num_experts,
            "top_k": self.model_cfg.top_k,
            "moe_layers": list(self.model_cfg.moe_layers),  # layer indices, in routed_experts order
        }

    @app.get("/metrics")
    async def prometheus(self, request: Request):
        self._auth(request)
        stats, counts = await self._gateway_stats()
        return Response(self.metrics.render(stats, counts), media_type="text/plain; version=0.0.4")

    async def _gateway_stats(self) -> tuple[dict, dict]:
        """Running and waiting requests and expert counts, summed over the gateway replicas."""
        replicas = sorted(known_replicas()) or [None]

        async def one(replica):
            h = self.gateway if replica is None else self.gateway.options(session_id=replica)
            try:
                return await h.stats.remote(), await h.expert_counts.remote()
            except Exception:
                return None

        answers = [a for a in await asyncio.gather(*(detached(one(r)) for r in replicas)) if a]
        if not answers:
            raise op.APIError(503, "no gateway answered", "service_unavailable")
        stats = {k: sum(a[0][k] for a in answers) for k in ("running", "waiting")}
        stats["gateways"] = len(answers)
        counts = answers[0][1]
        for _, c in answers[1:]:
            counts["counts"] = [
                [x + y for x, y in zip(r1, r2)] for r1, r2 in zip(counts["counts"], c["counts"])
            ]
        return stats, counts

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._handle("chat", request, lambda t0: self._chat(request, t0))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle("completions", request, lambda t0: self._completions(request, t0))

    # -- chat -------------------------------------------------------------------------------

    async def _chat(self, request: Request, t0: float):
        body = await json_body(request, self.args.max_body_bytes)
        req = op.parse_chat_request(body, images=self.model_cfg.is_vl)
        self._check_model(req.model)
        if self.tokenizer is None:
            op.check_without_tokenizer(req, self.model_name)
        op.check_logit_bias(req, self.model_cfg.vocab_size)
        await asyncio.to_thread(op.check_structured, req)
        images = await self.images.load(req)  # VL: checked and preprocessed, before tokenizing
        prompt = await asyncio.to_thread(op.chat_prompt_ids, req, self.tokenizer)
        expanded = self.images.expanded(prompt, images)  # what the engine computes and counts
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
            chunks = self._chat_chunks(req, header, choices, prompt)
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
        return resp.chat_completion(header, out, self._usage(len(prompt), choices), req, prompt)

    async def _chat_chunks(self, req, header, choices: list[Choice], prompt: list[int]):
        prompt_tokens = len(prompt)
        for c in choices:
            yield resp.chat_role_chunk(header, c.index, req, prompt if c is choices[0] else None)
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
        req = op.parse_completion_request(await json_body(request, self.args.max_body_bytes))
        self._check_model(req.model)
        if self.tokenizer is None:
            op.check_without_tokenizer(req, self.model_name)
            req.return_token_ids = True  # the answer has no text: its ids are the answer
        op.check_logit_bias(req, self.model_cfg.vocab_size)
        self.admission.check_choices(num_prompts(req.prompt), req.n)  # before tokenizing them all
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
        prompt_of = {c.index: prompts[c.index // req.n] for c in choices}
        echo_of = {}
        if req.echo:
            texts = op.echo_texts(req, prompts, self.tokenizer)
            echo_of = {c.index: texts[c.index // req.n] for c in choices}
        if req.stream:
            chunks = self._completion_chunks(
                req, header, choices, prompt_tokens, prompt_of, echo_of
            )
            return self._sse("completions", chunks, choices, prompt_tokens, t0)
        try:
            reasons = [await c.run_to_end() for c in choices]
        finally:  # a client gone mid-way cancels the handler: end its choices too
            self._end(choices)
            self._observe("completions", 200, t0, choices, prompt_tokens)
        out = [
            resp.completion_choice(
                req,
                c.index,
                self._answer(req, c),
                "length" if req.scores_only else r,
                self.tokenizer,
                prompt_of[c.index],
                self._echo(c, echo_of, prompt_of),
            )
            for c, r in zip(choices, reasons)
        ]
        usage = self._usage(prompt_tokens, choices, generated=not req.scores_only)
        return resp.completion_response(header, out, usage)

    @staticmethod
    def _echo(c: Choice, echo_of: dict, prompt_of: dict) -> resp.Echo | None:
        if c.index not in echo_of:
            return None
        return resp.Echo(echo_of[c.index], prompt_of[c.index], c.prompt_logprobs)

    async def _completion_chunks(
        self, req, header, choices: list[Choice], prompt_tokens: int, prompt_of: dict, echo_of
    ):
        if req.scores_only:  # one chunk per choice once it is done: its echo, no answer
            for c in choices:
                await c.run_to_end()
                yield resp.completion_chunk(
                    header,
                    req,
                    c.index,
                    Delta(),
                    self.tokenizer,
                    "length",
                    prompt_of[c.index],
                    self._echo(c, echo_of, prompt_of),
                )
            if req.include_usage:
                usage = self._usage(prompt_tokens, choices, generated=False)
                yield resp.completion_usage_chunk(header, usage)
            return
        first = set(prompt_of)  # choices whose first chunk is still to come
        async for c, delta, reason in merged(choices):
            head = c.index in first  # the first chunk carries the prompt's ids and its echo
            chunk = resp.completion_chunk(
                header,
                req,
                c.index,
                delta,
                self.tokenizer,
                reason,
                prompt_of[c.index] if head else None,
                self._echo(c, echo_of, prompt_of) if head else None,
                0 if head else len(echo_of.get(c.index, "")),
            )
            if chunk is not None:
                first.discard(c.index)
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

    def _usage(self, prompt_tokens: int, choices: list[Choice], generated: bool = True) -> dict:
        completion_tokens = sum(c.stream.num_tokens for c in choices) if generated else 0
        return resp.usage(prompt_tokens, completion_tokens, self.model_cfg)

    def _answer(self, req, c: Choice):
        """The choice's stream, or an empty one when only the prompt is scored."""
        return op.text_stream(req, self.tokenizer) if req.scores_only else c.stream
