"""The HTTP face of ``hbi-run serve``: routes, request limits, the API key, errors as JSON, metrics.

Every answer is JSON with the ``schema`` strings of the CLI's outputs; every error is
``{"error": {"type", "message", "hint"}}`` with an HTTP status (docs/serve.md, "Errors"), never a traceback.
Model work runs in the lanes of :class:`~hbi_runtime.serve.runtime.Runtime`; the event loop only waits for it
(with the request's deadline), so the loop keeps accepting while the model computes.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path
from typing import Annotated, Any, Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from hbi_runtime.errors import BadInputError, GateFailedError, HbiError, MismatchError, MissingDependencyError
from hbi_runtime.index import DamagedIndexError
from hbi_runtime.names import exact_text, path_b64
from hbi_runtime.serve import media
from hbi_runtime.serve.batching import LaneStopped, QueueFull
from hbi_runtime.serve.runtime import (NotFoundError, NotServedError, Runtime, TextWork, UnknownVideoError,
                                      VideoWork)

STATIC = Path(__file__).resolve().parent / "static"
PUBLIC = ("/healthz", "/readyz", "/", "/docs", "/favicon.ico")  # and /static/: no data in them
log = logging.getLogger("hbi.serve")


class BodyTooLarge(Exception):
    pass


class Timeout(Exception):
    pass


def _status(exc: Exception) -> int:
    if isinstance(exc, (QueueFull, LaneStopped)):
        return 503
    if isinstance(exc, Timeout):
        return 504
    explicit = getattr(exc, "status", None)
    if isinstance(explicit, int):
        return explicit
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, media.RangeNotSatisfiable):
        return 416
    if isinstance(exc, DamagedIndexError):
        return 503
    if isinstance(exc, (NotServedError, MissingDependencyError)):
        return 501
    if isinstance(exc, MismatchError):
        return 409
    if isinstance(exc, GateFailedError):
        return 500
    if isinstance(exc, HbiError):
        return 400 if exc.exit_code in (2, 3) else 500
    return 500


def error_body(kind: str, message: str, hint: Optional[str] = None) -> dict:
    return {"error": {"type": kind, "message": message, "hint": hint}}


def error_response(exc: Exception, request: Optional[Request] = None) -> JSONResponse:
    status = _status(exc)
    headers = {}
    if isinstance(exc, QueueFull):
        body = error_body("Overloaded", str(exc), "retry after the Retry-After seconds; the server sheds load "
                                                  "instead of queueing without bound")
        headers["Retry-After"] = "1"
    elif isinstance(exc, LaneStopped):
        body = error_body("ShuttingDown", "the server is shutting down", "retry on another instance")
        headers["Retry-After"] = "5"
    elif isinstance(exc, Timeout):
        body = error_body("DeadlineExceeded", str(exc), "retry later, or ask for less (fewer queries, a smaller "
                                                        "top_k); the deadline is hbi-run serve --request-timeout-s")
    elif isinstance(exc, HbiError):
        body = {"error": exc.to_json()}
        if isinstance(exc, DamagedIndexError):
            headers["Retry-After"] = "10"
        if isinstance(exc, media.RangeNotSatisfiable):
            headers["Content-Range"] = f"bytes */{exc.size}"
    else:
        log.exception("internal error", exc_info=exc)
        body = error_body("InternalError", "the server failed to answer this request (the server log has the "
                                           "details)", "retry; if it persists, report it with the server log")
    if request is not None:
        request.scope["hbi.error"] = body["error"]["type"]
    return JSONResponse(body, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


Levels = Optional[list[float]]


class RetrieveRequest(_Body):
    queries: list[str] = Field(..., min_length=1, description="One or more text queries.")
    top_k: int = Field(10, ge=1, description="Hits per query (at most the server's --max-top-k).")
    levels: Levels = Field(None, description="Level weights (entity, action, event); default: the package's.")
    explain: bool = Field(False, description="Add each hit's entity-level Banzhaf interaction map.")
    explain_samples: Optional[int] = Field(None, ge=1, description="Monte-Carlo coalitions per map.")


class EncodeTextRequest(_Body):
    texts: list[str] = Field(..., min_length=1)


class RetrieveCaptionsRequest(_Body):
    video_id: int
    captions: list[str] = Field(..., min_length=1)
    top_k: Optional[int] = Field(None, ge=1)
    levels: Levels = None


class QARequest(_Body):
    video_id: int
    question: str
    top_k: int = Field(5, ge=1, le=100)
    levels: Levels = Field(None, description="Answer weights per level; default: the QA package's.")


class CaptionRequest(_Body):
    video_id: int
    question: Optional[str] = Field(None, description="Answer this open question instead of captioning.")
    beam_size: int = Field(1, ge=1, le=8)
    max_length: int = Field(40, ge=2, le=77)


class ExplainRequest(_Body):
    query: str
    video_id: int
    levels: Optional[list[str]] = Field(None, description="Level names (entity, action, event); default: all.")
    samples: Optional[int] = Field(None, ge=1)
    seed: int = 0


# ------------------------------------------------------------------------------------------- the app
def create_app(rt: Runtime) -> FastAPI:
    """The FastAPI application over a loaded :class:`Runtime` (which the caller closes)."""
    cfg = rt.config
    metrics = rt.metrics
    app = FastAPI(title="hbi-toolkit serve", version="1", docs_url=None, redoc_url=None,
                  description="Text-to-video retrieval, QA, captioning and Banzhaf explanations over one hot "
                              "index (docs/serve.md). Errors: {\"error\": {\"type\", \"message\", \"hint\"}}.")
    sha = rt.model.package.manifest_sha256

    # ------------------------------------------------------------------ errors
    @app.exception_handler(HbiError)
    async def _hbi(request: Request, exc: HbiError):
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = []
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            request.scope["hbi.error"] = "ValidationError"
            return JSONResponse(error_body("ValidationError", "the request body is not valid JSON",
                                           'send a JSON object, e.g. {"queries": ["a dog runs"]}'), status_code=422)
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            problems.append(f"{where}: {e.get('msg', 'invalid')}")
        request.scope["hbi.error"] = "ValidationError"
        return JSONResponse(error_body("ValidationError", "the request is not valid: " + "; ".join(problems),
                                       "see the request schema at /openapi.json (or the page at /docs)"),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if request.scope.get("hbi.body_too_large"):
            return await _large(request, BodyTooLarge())
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        message = {404: f"no such route: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                      str(exc.detail))
        request.scope["hbi.error"] = kind
        return JSONResponse(error_body(kind, message, "the routes are listed at /docs"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(BodyTooLarge)
    async def _large(request: Request, exc: BodyTooLarge):
        request.scope["hbi.error"] = "PayloadTooLarge"
        return JSONResponse(error_body("PayloadTooLarge", f"the request body is larger than {cfg.max_body_bytes} "
                                                          "bytes", "send fewer or shorter queries per request"),
                            status_code=413)

    async def _ours(request: Request, exc: Exception):
        return error_response(exc, request)

    for kind in (QueueFull, LaneStopped, Timeout):  # the server's own refusals, not failures
        app.add_exception_handler(kind, _ours)
    app.add_exception_handler(Exception, _ours)  # a bug: 500 with the error body (Starlette re-raises it to _Guard)

    # ------------------------------------------------------------------ helpers
    async def run(lane: str, payload: Any, units: int = 1):
        future = rt.lanes[lane].submit(payload, units)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), cfg.request_timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # dropped unless already computing
            raise Timeout(f"no answer within the server's deadline of {cfg.request_timeout_s:g} s") from None

    def check_texts(texts: list[str], what: str) -> list[str]:
        if len(texts) > cfg.max_queries:
            raise BadInputError(f"{len(texts)} {what} in one request; this server takes at most {cfg.max_queries}",
                                hint="split them over several requests")
        for i, t in enumerate(texts):
            if not t.strip():
                raise BadInputError(f"{what[:-1]} {i + 1} is empty", hint=f"remove the empty {what[:-1]}")
            if len(t) > cfg.max_query_chars:
                raise BadInputError(f"{what[:-1]} {i + 1} has {len(t)} characters; at most {cfg.max_query_chars}",
                                    hint="the model reads only its first words anyway (77 BPE tokens)")
        return texts

    def check_levels(levels: Levels) -> Optional[tuple[float, ...]]:
        if levels is None:
            return None
        import math

        if len(levels) != 3 or not all(math.isfinite(v) for v in levels):
            raise BadInputError(f"levels must be three finite numbers (entity, action, event), got {levels}",
                                hint="e.g. [1, 0, 0] or [0.4, 0.4, 0.2]")
        return tuple(float(v) for v in levels)

    def video(video_id: int):
        served = rt.holder.current()
        row = served.row_of(video_id)
        if row is None:
            raise UnknownVideoError(f"no video with id {video_id} in the served index",
                                    hint="take video_id from a /v1/retrieve hit")
        return served, row

    def head(schema: str) -> dict:
        return {"schema": schema, "model_sha256": sha}

    def hit_dict(hit) -> dict:
        d = hit.to_dict()
        d.pop("abs_path", None)  # the server's file system stays private: paths are relative to the folder
        d.pop("abs_path_b64", None)
        return d

    def shown(row) -> dict:
        return {"video_id": row.video_id, "path": exact_text(row.rel), "path_b64": path_b64(row.rel)}

    # ------------------------------------------------------------------ health, metrics, page
    @app.get("/healthz", summary="The process is up")
    async def healthz():
        return {"status": "ok", "uptime_s": round(time.time() - rt.started, 3)}

    @app.get("/readyz", summary="Model and index loaded (503 while not)")
    async def readyz():
        if rt.holder.ready:
            served = rt.holder.current()
            return {"ready": True, "videos": served.videos, "rows": len(served.index.rows),
                    "generation": served.token[1] if len(served.token) > 1 else None,
                    "loaded_at": served.loaded_at}
        err = rt.holder.error
        body = {"ready": False, **({"error": err.to_json()} if err is not None else {})}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        return Response(metrics.render(rt.lanes, rt.holder.ready), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def api_page():
        return FileResponse(STATIC / "api.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------------ retrieval
    @app.post("/v1/retrieve", summary="Rank the served videos for one or more text queries (hbi.retrieve/2)")
    async def retrieve(body: RetrieveRequest):
        from hbi_runtime.search import RETRIEVE_SCHEMA

        queries = check_texts(body.queries, "queries")
        if body.top_k > cfg.max_top_k:
            raise BadInputError(f"top_k {body.top_k} is more than this server's limit {cfg.max_top_k}")
        samples = None
        if body.explain:
            from hbi_runtime.explain.banzhaf import DEFAULT_SAMPLES

            samples = body.explain_samples or DEFAULT_SAMPLES
            if samples > cfg.max_explain_samples:
                raise BadInputError(f"explain_samples {samples} is more than {cfg.max_explain_samples}")
        answer = await run("text", TextWork("retrieve", tuple(queries), body.top_k, check_levels(body.levels),
                                            samples), len(queries))
        served = answer.served
        return {**head(RETRIEVE_SCHEMA), "index": str(served.index.dir), "generation": served.token[1],
                "ranking": answer.results[0].ranking,
                "queries": [{"query": r.query, "truncated": r.truncated, "hits": [hit_dict(h) for h in r.hits]}
                            for r in answer.results]}

    @app.post("/v1/encode-text", summary="The text side of each text (hbi.encode-text/1)")
    async def encode_text(body: EncodeTextRequest):
        from hbi_runtime.sides import LEVELS

        texts = check_texts(body.texts, "texts")
        side = (await run("text", TextWork("encode", tuple(texts)), len(texts))).side
        out = []
        for i, t in enumerate(texts):
            levels = [{"level": LEVELS[k], "tokens": lv.tokens[i].tolist(), "weights": lv.weights[i].tolist(),
                       "mask": lv.mask[i].astype(bool).tolist()} for k, lv in enumerate(side.levels)]
            out.append({"text": t, "truncated": bool(side.truncated[i]), "levels": levels})
        return {**head("hbi.encode-text/1"), "texts": out}

    @app.post("/v1/retrieve-captions", summary="Rank captions for one served video (hbi.retrieve-captions/1)")
    async def retrieve_captions(body: RetrieveCaptionsRequest):
        from hbi_runtime.search import rank_captions

        captions = check_texts(body.captions, "captions")
        _, row = video(body.video_id)
        levels = check_levels(body.levels)
        ranked = await run("pair", lambda: rank_captions(rt.model, row.path, captions, top_k=body.top_k,
                                                         level_weights=levels))
        return {**head("hbi.retrieve-captions/1"), "video": exact_text(row.rel), "video_b64": path_b64(row.rel),
                "video_id": row.video_id, "captions": ranked}

    # ------------------------------------------------------------------ qa, caption, explain
    @app.post("/v1/qa", summary="Answer a question about a served video (hbi.qa/1)")
    async def qa(body: QARequest):
        if rt.qa is None:
            raise NotServedError("this server has no QA package", hint="restart it with --qa-model QA_PKG")
        check_texts([body.question], "questions")
        _, row = video(body.video_id)
        weights = check_levels(body.levels)
        answered = await run("qa", VideoWork(row.path, body.question, (body.top_k, weights)))
        result = {**answered.to_dict(), **shown(row)}
        result["video"] = result["path"]
        return {"schema": "hbi.qa/1", "model_sha256": rt.qa.package.manifest_sha256,
                "model": Path(rt.qa.package.dir).name,
                "answer_weights": list(weights or rt.qa.package.manifest.answer_weights), "results": [result],
                "failed": [], "accuracy": None}

    @app.post("/v1/caption", summary="Caption a served video, or answer an open question (hbi.caption/1)")
    async def caption(body: CaptionRequest):
        from hbi_runtime.tasks.generate import SearchOptions

        if rt.caption is None:
            raise NotServedError("this server has no caption package", hint="restart it with --caption-model PKG")
        if body.question is not None:
            check_texts([body.question], "questions")
        _, row = video(body.video_id)
        options = SearchOptions(beam_size=body.beam_size, max_length=body.max_length)
        r = await run("caption", VideoWork(row.path, body.question, options))
        return {"schema": "hbi.caption/1", "caption_package_sha256": rt.caption.manifest.sha256,
                "model_sha256": rt.caption.retrieval.package.manifest_sha256,
                "search": {"beam_size": body.beam_size, "max_length": body.max_length, "length_penalty": 1.0,
                           "no_repeat_ngram": 0},
                "results": [{**shown(row), "question": r.question, "text": r.text, "tokens": list(r.tokens),
                             "logprob": round(r.logprob, 6), "score": round(r.score, 6), "error": None}]}

    @app.post("/v1/explain", summary="Banzhaf interaction maps of a query and a served video (hbi.explain/1)")
    async def explain(body: ExplainRequest):
        from hbi_runtime.explain.banzhaf import DEFAULT_SAMPLES
        from hbi_runtime.explain.explainer import explain_pair

        check_texts([body.query], "queries")
        samples = body.samples or DEFAULT_SAMPLES
        if samples > cfg.max_explain_samples:
            raise BadInputError(f"samples {samples} is more than {cfg.max_explain_samples}")
        _, row = video(body.video_id)
        pair = await run("pair", lambda: explain_pair(rt.model, body.query, row.path, levels=body.levels,
                                                      samples=samples, seed=body.seed))
        doc = pair.to_dict()
        doc.update(video=exact_text(row.rel), video_b64=path_b64(row.rel), video_id=row.video_id)
        return doc

    # ------------------------------------------------------------------ index
    @app.get("/v1/index/status", summary="The index --status document (hbi.index-status/1)")
    async def index_status(verify: bool = False):
        return await asyncio.to_thread(rt.holder.status, verify=verify)

    @app.post("/v1/index/update", status_code=202,
              summary="Index what changed in the served folder, in the background (hbi.index-job/1)")
    async def index_update():
        job = rt.jobs.start()
        return JSONResponse(job.to_dict(), status_code=202,
                            headers={"Location": f"/v1/index/jobs/{job.id}"})

    @app.get("/v1/index/jobs/{job_id}", summary="An index job's progress (hbi.index-job/1)")
    async def index_job(job_id: str):
        job = rt.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no index job {job_id} (finished jobs are kept for a while, then forgotten)",
                                hint="POST /v1/index/update starts one")
        return job.to_dict()

    # ------------------------------------------------------------------ media
    @app.get("/v1/videos/{video_id}", summary="What the index holds of one video")
    async def video_info(video_id: int):
        served, row = video(video_id)
        rows = [r for r in served.index.rows if r.video_id == video_id] if served.videos < 100_000 else [row]
        return {"schema": "hbi.video/1", "model_sha256": sha, **shown(row), "duration_s": row.duration,
                "windows": [{"start_s": r.start_s, "end_s": r.end_s} for r in rows]}

    @app.get("/v1/videos/{video_id}/media", summary="The video file (HTTP range requests)")
    async def video_media(video_id: int, request: Request):
        _, row = video(video_id)
        fd, st = media.open_regular(row.path)
        try:
            rng = media.byte_range(request.headers.get("range"), st.st_size)
        except media.RangeNotSatisfiable:
            import os

            os.close(fd)
            raise
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(rng.length if st.st_size else 0),
                   "Cache-Control": "private, max-age=60"}
        if rng.partial:
            headers["Content-Range"] = f"bytes {rng.start}-{rng.end}/{rng.size}"
        return StreamingResponse(media.read_chunks(fd, rng.start, rng.length if st.st_size else 0),
                                 status_code=206 if rng.partial else 200, media_type=media.media_type(row.path),
                                 headers=headers)

    @app.get("/v1/videos/{video_id}/thumbnail", summary="A JPEG of the frame at t seconds (cached in the index)")
    async def video_thumbnail(video_id: int, t: Annotated[float, Query(ge=0, le=1e6)] = 0.0):
        served, row = video(video_id)
        data = await asyncio.to_thread(media.thumbnail, served.index.dir, row.path, t)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return _Guard(app, rt)


class _Guard:
    """ASGI middleware around the app: the API key, the body limit, CORS (only when origins are given), and
    the request metrics (route template, status, error type, latency)."""

    def __init__(self, app: FastAPI, rt: Runtime) -> None:
        self.app, self.rt, self.fastapi = app, rt, app
        self.key = rt.config.api_key.encode() if rt.config.api_key else None
        self.limit = rt.config.max_body_bytes
        self.origins = set(rt.config.cors_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        cors = origin is not None and origin in self.origins

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if cors:
                    extra += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        try:
            path = scope.get("path", "")
            if cors and scope["method"] == "OPTIONS":
                await _plain(sending, 204, None, [(b"access-control-allow-methods", b"GET, POST"),
                                                  (b"access-control-allow-headers",
                                                   b"authorization, content-type, x-api-key"),
                                                  (b"access-control-max-age", b"600")])
                return
            if self.key is not None and not (path in PUBLIC or path.startswith("/static/")):
                if not self._authorised(headers):
                    scope["hbi.error"] = "Unauthorized"
                    await _plain(sending, 401, error_body(
                        "Unauthorized", "this server needs an API key", "send it as 'Authorization: Bearer KEY' "
                                                                        "(or 'X-API-Key: KEY')"),
                        [(b"www-authenticate", b'Bearer realm="hbi-serve"')])
                    return
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                scope["hbi.error"] = "PayloadTooLarge"
                await _plain(sending, 413, error_body("PayloadTooLarge", f"the request body is larger than "
                                                                         f"{self.limit} bytes",
                                                      "send fewer or shorter queries per request"))
                return
            received = 0

            async def limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        scope["hbi.body_too_large"] = True  # FastAPI turns the raise into its own 400
                        raise BodyTooLarge()
                return message

            try:
                await self.app(scope, limited, sending)
            except Exception as exc:  # noqa: BLE001 - answered by the app's handler already, or answer it here
                if status.get("started"):
                    log.debug("error after the response started: %r", exc)
                else:
                    log.exception("internal error", exc_info=exc)
                    await _plain(sending, 500, error_body("InternalError", "the server failed to answer this "
                                                                           "request (the server log has the details)"))
        finally:
            self._observe(scope, status["code"], time.perf_counter() - t0)

    def _authorised(self, headers: dict) -> bool:
        given = headers.get("x-api-key", "")
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.key)

    def _observe(self, scope, status: int, seconds: float) -> None:
        metrics = self.rt.metrics
        route = scope.get("route")
        path = getattr(route, "path", None)
        if path is None:
            path = "/static" if scope.get("path", "").startswith("/static/") else "unmatched"
        metrics.requests.labels(path, str(status)).inc()
        metrics.latency.labels(path).observe(seconds)
        if status >= 400:
            metrics.errors.labels(path, scope.get("hbi.error", "HTTPError")).inc()


async def _plain(send, status: int, body: Optional[dict], headers: Optional[list] = None) -> None:
    import json

    data = b"" if body is None else json.dumps(body).encode()
    hdrs = [(b"content-length", str(len(data)).encode())] + (headers or [])
    if body is not None:
        hdrs.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})
