"""The ingress's FastAPI app: errors in OpenAI's format, bounded request bodies, the page files.

Every error leaves as `{"error": {...}}` with its status (429 and 503 with Retry-After and
retry-after-ms); a body is read no further than its limit (413) and parsed off the event loop
when large; the chat page's three files are served from a fixed list.
"""

# No `from __future__ import annotations`: FastAPI must see real annotations.
import asyncio
import json
import logging
import math
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai_protocol as op

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


def parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise op.bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise op.bad_request("the request body is nested too deeply") from None


async def json_body(request: Request, limit: int):
    """The parsed body; 413 past `limit` bytes, without reading more than that."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(int(length), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if len(raw) > PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


def num_prompts(prompt) -> int:
    """Prompts in a completions `prompt`: a text or token ids are one, a list of them many."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def too_large(size: int, limit: int) -> op.APIError:
    message = f"the request body is {size}+ bytes; this server takes at most {limit}"
    return op.APIError(413, message, "invalid_request_error", code="request_too_large")


def page_file(name: str) -> FileResponse:
    if name not in PAGE_FILES:  # a fixed list: no path from the URL reaches the filesystem
        raise op.APIError(404, f"GET /static/{name}: no such file", "not_found_error")
    return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers=PAGE_HEADERS)
