"""HTTP routes of the extension: the JSON API under ``/handoff/api`` and the HTML status pages.

Every route is authenticated by Jupyter Server (``@web.authenticated``) and authorized on the
resource ``handoff``; errors are JSON ``{"error": what happened, "hint": what to do}``. The
server never unpickles: manifests are checked as JSON and chunks only by their hash.
"""
from __future__ import annotations

import asyncio
import copy
import json
import re
from typing import Any, cast

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from markupsafe import Markup
from tornado import web
from tornado.http1connection import HTTP1Connection

from handoff_magic.state import (STATUS_LABELS, TERMINAL_STATUSES, RunState, StateError, check_run_id,
                                  describe_compaction, describe_usage)

from .notify import links
from .store import BlobError, check_sha

RESOURCE = "handoff"
RUN_ID = r"(?P<run_id>[A-Za-z0-9_-]{1,64})"
API = "/handoff/api"
MAX_JSON_BYTES = 64 * 1024 * 1024     # a manifest for a huge namespace is still far below this
MAX_ANSWER_CHARS = 100_000
DISCARD_BYTES = 4 * 1024 * 1024     # refused uploads up to this size are drained to answer cleanly
IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
NOT_FOUND_HINT = "list runs with GET /handoff/api/runs or %reattach"


class HandoffError(web.HTTPError):
    """An error the client can act on; rendered as ``{"error", "hint", **extra}``."""

    def __init__(self, status: int, error: str, hint: str, **extra: Any) -> None:
        super().__init__(status, log_message=error.replace("%", "%%"))
        self.error = error
        self.hint = hint
        self.extra = extra


_DEFAULT_HINTS = {
    400: "check the request against the jupyter-handoff API",
    403: "send a valid Jupyter Server token (Authorization: token …) or log in; "
         "for form posts include the _xsrf field",
    404: "check the URL; " + NOT_FOUND_HINT,
    405: "this route does not accept that method",
    413: "the request is too large for this server",
    500: "this is a bug in jupyter-handoff; the server log has the traceback",
    503: "the handoff runner is not available on this server; check the server log",
}


class _Base(ExtensionHandlerMixin):
    """Shared helpers; ``auth_resource`` makes ``@authorized`` check the resource ``handoff``."""

    auth_resource = RESOURCE

    @property
    def handoff(self) -> Any:
        return self.settings["handoff_app"]

    @property
    def public_url(self) -> str:
        return self.handoff.get_public_url()

    def run_summary(self, run_id: str) -> dict[str, Any]:
        try:
            summary = self.handoff.store.summary(run_id)
        except KeyError:
            raise HandoffError(404, f"no run with id {run_id!r} on this server", NOT_FOUND_HINT) from None
        summary["links"] = links(self.public_url, run_id)
        return summary

    def runner(self) -> Any:
        rm = self.handoff.run_manager
        if rm is None:
            raise HandoffError(503, "the handoff runner did not load on this server, so runs cannot "
                               "execute", "check the Jupyter Server log for the import error")
        return rm


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")



def _connection(handler: web.RequestHandler) -> HTTP1Connection:
    """The request's connection as tornado's HTTP server makes it (body-size limit, client stream)."""
    return cast(HTTP1Connection, handler.request.connection)


class HandoffAPIHandler(_Base, APIHandler):
    """JSON in, JSON out, JSON errors."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, HandoffError):
            reply: dict[str, Any] = {"error": exc.error, "hint": exc.hint, **exc.extra}
        else:
            error = (exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message
                     else self._reason)
            if status_code == 403:
                error = f"not authorized: {error}"
            reply = {"error": error, "hint": _DEFAULT_HINTS.get(status_code, "see the server log")}
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(reply))

    def json_body(self) -> dict[str, Any]:
        body = self.request.body or b""
        if len(body) > MAX_JSON_BYTES:
            raise HandoffError(413, f"request body is {len(body)} bytes, over the {MAX_JSON_BYTES} byte limit",
                               "send less data per request")
        if not body.strip():
            return {}
        try:  # NaN/Infinity are not JSON; stored state must stay readable by SQLite's json1
            data = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise HandoffError(400, f"request body is not valid JSON ({str(exc)[:200]})",
                               "send a JSON object; the upload may have been cut off, retry it") from None
        if not isinstance(data, dict):
            raise HandoffError(400, "request body must be a JSON object", "wrap the fields in {...}")
        return data

    def send(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# blobs
# ---------------------------------------------------------------------------------------------
class MissingBlobsHandler(HandoffAPIHandler):
    @web.authenticated
    @authorized
    def post(self) -> None:
        shas = self.json_body().get("shas")
        if not isinstance(shas, list) or len(shas) > 1_000_000:
            raise HandoffError(400, "'shas' must be a list of chunk ids", 'send {"shas": ["<sha256>", ...]}')
        try:
            for sha in shas:
                check_sha(sha)
        except BlobError as exc:
            raise HandoffError(400, str(exc), "chunk ids are sha256 hex digests of the stored bytes") from None
        # the bundle limit travels along, so a client streaming chunks can stop before uploading
        # a bundle this server would refuse anyway
        self.send({"missing": self.handoff.blobs.missing(shas), "max_bundle_bytes": self.handoff.max_bundle_bytes})


BODY_PIECE = 1024 * 1024   # bytes tornado hands a streaming upload at once (its default is 64 KiB)


def _bigger_body_pieces(connection: Any) -> None:
    """Read this upload connection's bodies in pieces of up to BODY_PIECE: 16x fewer callbacks
    per chunk. The parameters object is shared by every connection of the server, so this one
    gets its own copy; other handlers are unaffected."""
    params = getattr(connection, "params", None)
    if params is not None and getattr(params, "chunk_size", BODY_PIECE) < BODY_PIECE:
        params = copy.copy(params)
        params.chunk_size = BODY_PIECE
        connection.params = params


@web.stream_request_body
class BlobHandler(HandoffAPIHandler):
    """HEAD (exists?), GET (stored bytes), PUT (streamed upload, hash verified, size capped)."""

    _writer: Any = None
    _deferred: web.HTTPError | None = None

    async def prepare(self) -> None:  # type: ignore[override]
        if self.request.method != "PUT":
            await super().prepare()
            return
        # The body streams in before put() runs, so authenticate and bound it here. An error is
        # answered after the (small) body is drained: closing a socket with unread bytes resets
        # it, and the client would never see the JSON error.
        try:
            await super().prepare()
            if not self.current_user:
                raise web.HTTPError(403, "no valid token or login")
            if not await _is_authorized(self, "write"):
                raise web.HTTPError(403, f"user may not write to resource {RESOURCE}")
            sha = self.path_kwargs["sha"]
            try:
                check_sha(sha)
            except BlobError as exc:
                raise HandoffError(400, str(exc), "PUT each chunk at /handoff/api/blobs/<sha256 of its "
                                   "bytes>") from None
            cap = self.handoff.max_chunk_bytes
            length = self.request.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > cap:
                raise HandoffError(413, f"chunk of {int(length)} bytes is over the {cap} byte limit",
                                   "split data into smaller chunks or raise HandoffApp.max_chunk_bytes")
            _connection(self).set_max_body_size(cap + DISCARD_BYTES)
            _bigger_body_pieces(_connection(self))
            self._writer = self.handoff.blobs.writer(sha, cap)
        except web.HTTPError as exc:
            self._deferred = exc
            _connection(self).set_max_body_size(DISCARD_BYTES)

    def data_received(self, chunk: bytes) -> Any:
        """Hand the piece to the writer's thread; when the disk is behind, tornado waits for the
        returned future before it reads more (back pressure instead of memory)."""
        if self._writer is None:
            return None  # draining a refused body
        try:
            if self._writer.offer(chunk):
                return None
            return asyncio.get_running_loop().run_in_executor(None, self._write_or_refuse, self._writer, chunk)
        except BlobError as exc:  # over the cap while streaming (no Content-Length)
            self._refuse(exc)
            return None

    def _write_or_refuse(self, writer: Any, chunk: bytes) -> None:
        try:
            writer.write(chunk)
        except BlobError as exc:
            self._refuse(exc)

    def _refuse(self, exc: BlobError) -> None:
        self._writer = None
        self._deferred = HandoffError(413, str(exc), "split data into smaller chunks or raise "
                                      "HandoffApp.max_chunk_bytes")

    def on_connection_close(self) -> None:
        if self._writer is not None:  # cut mid-body: drop the temp file, nothing is published
            self._writer.abort()
            self._writer = None
        super().on_connection_close()

    def on_finish(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    @web.authenticated
    @authorized
    async def put(self, sha: str) -> None:
        if self._deferred is not None:
            raise self._deferred
        writer, self._writer = self._writer, None
        if writer is None:
            raise HandoffError(400, "upload was not received", "retry the PUT")
        try:  # fsyncs: off the event loop, or 20 concurrent uploads stall every status call
            created = await asyncio.to_thread(writer.commit)
        except BlobError as exc:
            raise HandoffError(400, str(exc), "upload the chunk again; nothing was stored") from None
        self.send({"sha256": sha, "size": writer.size, "created": created}, 201 if created else 200)

    def _existing(self, sha: str) -> Any:
        try:
            path = self.handoff.blobs.path(sha)
        except BlobError as exc:
            raise HandoffError(400, str(exc), "chunk ids are sha256 hex digests") from None
        if not path.is_file():
            raise HandoffError(404, f"chunk {sha} is not on this server", "upload it with PUT")
        return path

    @web.authenticated
    @authorized
    def head(self, sha: str) -> None:
        path = self._existing(sha)
        self.set_header("Content-Length", str(path.stat().st_size))
        self.set_status(200)
        self.finish(set_content_type="application/octet-stream")

    @web.authenticated
    @authorized
    async def get(self, sha: str) -> None:
        path = self._existing(sha)
        self.set_header("Content-Length", str(path.stat().st_size))
        with open(path, "rb") as f:  # noqa: ASYNC230 - local 1 MiB reads, the loop runs between flushes
            while piece := f.read(1024 * 1024):
                self.write(piece)
                await self.flush()
        self.finish(set_content_type="application/octet-stream")


async def _is_authorized(handler: Any, action: str) -> bool:
    result = handler.authorizer.is_authorized(handler, handler.current_user, action, RESOURCE)
    if asyncio.iscoroutine(result):
        result = await result
    return bool(result)


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def _bundle_size(manifest: dict[str, Any]) -> int:
    total = 0
    chunks = manifest.get("chunks")
    if isinstance(chunks, dict):
        for meta in chunks.values():
            if isinstance(meta, dict):
                stored = meta.get("stored", meta.get("size", 0))
                if isinstance(stored, int) and stored > 0:
                    total += stored
    return total


class RunsHandler(HandoffAPIHandler):
    @web.authenticated
    @authorized
    def get(self) -> None:
        runs = self.handoff.store.list_runs()
        for r in runs:
            r["links"] = links(self.public_url, r["id"])
        self.send({"runs": runs})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        sandbox = getattr(self.handoff, "sandbox_state", None)
        if sandbox is not None and sandbox.problem:  # refuse before anything is stored
            raise HandoffError(503, sandbox.problem, sandbox.hint)
        body = self.json_body()
        key = body.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not IDEMPOTENCY_KEY.match(key)):
            raise HandoffError(400, "idempotency_key must be 1-200 letters, digits or ._:-",
                               "use a uuid4 hex per handoff")
        store = self.handoff.store
        if key:  # a retried create: answer with the run the first attempt made
            existing = store.run_by_key(key)
            if existing is not None:
                self.send(self.run_summary(existing), 200)
                return
        manifest = body.get("manifest")
        if not isinstance(manifest, dict):
            raise HandoffError(400, "request has no 'manifest' object",
                               'POST {"manifest": {...}, "idempotency_key": "..."} (%handoff does this)')
        # a manifest may list 100k entries and chunks: check it off the event loop
        state = await asyncio.to_thread(self.check_manifest, manifest)
        self.runner()  # 503 before anything is written if runs cannot execute here
        summary, created = store.create_run(state, manifest, key or None)
        if created:
            self.runner().submit(summary["id"])
        self.send(self.run_summary(summary["id"]), 201 if created else 200)

    def check_manifest(self, manifest: dict[str, Any]) -> RunState:
        """JSON-only checks, then every chunk present with its declared size; the RunState."""
        size = _bundle_size(manifest)
        limit = self.handoff.max_bundle_bytes
        if size > limit:
            raise HandoffError(413, f"bundle is {size} bytes, over this server's limit of {limit} bytes",
                               "hand off fewer or smaller variables (del big ones, or use files), "
                               "or ask the admin to raise HandoffApp.max_bundle_bytes")
        from handoff_magic.errors import BundleError
        from handoff_magic.manifest import Manifest
        try:
            shas = Manifest.parse(manifest, max_bytes=limit).shas
        except (BundleError, StateError, ValueError, TypeError, KeyError, RecursionError) as exc:
            raise HandoffError(400, f"manifest rejected: {exc}",
                               "capture the bundle again with %handoff; hand-made manifests must "
                               "follow docs/internals.md") from None
        run = manifest.get("run")
        if not isinstance(run, dict):
            raise HandoffError(400, "manifest has no 'run': there is no agent run to resume",
                               "start a run with %agent, then %handoff it")
        try:
            state = RunState.from_dict(run)
            check_run_id(state.id)
        except StateError as exc:
            raise HandoffError(400, f"run state rejected: {exc}", "capture the run again with %handoff") from None
        blobs = self.handoff.blobs
        chunks = manifest.get("chunks") or {}
        shas = sorted(set(shas) | set(chunks))
        missing = blobs.missing(shas)
        if missing:
            raise HandoffError(400, f"manifest references {len(missing)} chunk(s) this server does not have",
                               "upload them with PUT /handoff/api/blobs/<sha> first (%handoff does "
                               "this), then create the run again", missing=missing)
        for sha in shas:
            declared = (chunks.get(sha) or {}).get("stored")
            actual = blobs.size(sha)
            if isinstance(declared, int) and actual != declared:
                raise HandoffError(400, f"chunk {sha} is {actual} bytes on the server but the "
                                   f"manifest declares {declared}", "capture the bundle again")
        return state


class RunHandler(HandoffAPIHandler):
    @web.authenticated
    @authorized
    def get(self, run_id: str) -> None:
        self.send(self.run_summary(run_id))


def _event_dict(ev: Any) -> dict[str, Any]:
    return {"seq": ev.seq, "type": ev.type, "data": ev.data, "time": ev.time}


class EventsHandler(HandoffAPIHandler):
    @web.authenticated
    @authorized
    async def get(self, run_id: str) -> None:
        store = self.handoff.store
        if not store.has_run(run_id):
            raise HandoffError(404, f"no run with id {run_id!r} on this server", NOT_FOUND_HINT)
        try:
            after = max(0, int(self.get_argument("after", "0")))
            timeout = float(self.get_argument("timeout", "0"))
            limit = int(self.get_argument("limit", "500"))
        except ValueError:
            raise HandoffError(400, "after and limit must be integers and timeout a number",
                               "e.g. ?after=12&timeout=25") from None
        if timeout != timeout:  # NaN
            timeout = 0.0
        timeout = max(0.0, min(timeout, self.handoff.max_events_wait))
        limit = max(1, min(limit, 5000))
        events = await store.wait_events(run_id, after, timeout, limit=limit)
        stream = _connection(self).stream
        if stream is not None and stream.closed():
            return  # the client went away while we waited
        last = store.last_seq(run_id)
        self.send({"events": [_event_dict(e) for e in events],
                   # never past what this client has seen: an event committed after the wait
                   # returned must still come in the next poll
                   "last_seq": events[-1].seq if events else min(after, last),
                   "status": store.status(run_id)})


class AnswerHandler(HandoffAPIHandler):
    @web.authenticated
    @authorized
    async def post(self, run_id: str) -> None:
        summary = self.run_summary(run_id)
        text = self.json_body().get("answer")
        if not isinstance(text, str) or not text.strip():
            raise HandoffError(400, "answer must be a non-empty string", 'POST {"answer": "..."}')
        if len(text) > MAX_ANSWER_CHARS:
            raise HandoffError(413, f"answer is over {MAX_ANSWER_CHARS} characters", "shorten it")
        await submit_answer(self, run_id, summary, text)
        self.send(self.run_summary(run_id))


async def submit_answer(handler: _Base, run_id: str, summary: dict[str, Any], text: str) -> None:
    if summary["status"] != "waiting_input":
        raise HandoffError(409, f"run {run_id} is {summary['status']}, not waiting for input",
                           "answer only when the run asks a question (status waiting_input)")
    async with runner_errors(run_id):
        await handler.runner().answer(run_id, text)


class runner_errors:  # lower case: used as a context manager, like contextlib's helpers
    """Map the runner's refusals onto HTTP: a run that changed state meanwhile is a 409."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc is None or isinstance(exc, web.HTTPError):
            return False
        from .runner import RunConflict, RunFailure
        if isinstance(exc, RunConflict):
            raise HandoffError(409, str(exc), "reload the run with GET /handoff/api/runs/<id>") from exc
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            raise HandoffError(409, str(exc) or f"run {self.run_id} did not reach a step boundary in time",
                               "try again in a moment, or cancel the run") from exc
        if isinstance(exc, RunFailure):
            raise HandoffError(409, exc.message, exc.hint or "see the run's events") from exc
        if isinstance(exc, KeyError):
            raise HandoffError(404, f"no run with id {self.run_id!r} on this server", NOT_FOUND_HINT) from exc
        return False


class CancelHandler(HandoffAPIHandler):
    @web.authenticated
    @authorized
    async def post(self, run_id: str) -> None:
        summary = self.run_summary(run_id)
        if summary["status"] in TERMINAL_STATUSES:
            raise HandoffError(409, f"run {run_id} already ended ({summary['status']})", "nothing to cancel")
        async with runner_errors(run_id):
            await self.runner().cancel(run_id)
        self.send(self.run_summary(run_id))


class PullHandler(HandoffAPIHandler):
    @web.authenticated
    @authorized
    async def post(self, run_id: str) -> None:
        summary = self.run_summary(run_id)
        if summary["status"] in TERMINAL_STATUSES and summary["status"] != "pulled":
            raise HandoffError(409, f"run {run_id} ended ({summary['status']}); it can no longer be pulled "
                               "as a live run", "fetch its last state with GET /handoff/api/runs/<id>/bundle")
        timeout = self.json_body().get("timeout", 120)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            timeout = 120
        if summary["status"] == "pulled":
            manifest = bundle_manifest(self, run_id)
        else:
            async with runner_errors(run_id):
                manifest = await self.runner().pull(run_id, timeout=min(float(timeout), 600.0))
        out = self.run_summary(run_id)
        out["manifest"] = manifest
        self.send(out)


def bundle_manifest(handler: _Base, run_id: str) -> dict[str, Any]:
    """Latest checkpoint (else the handoff manifest) with ``run`` = the server's current RunState."""
    store = handler.handoff.store
    manifest = store.manifest(run_id, "checkpoint") or store.manifest(run_id, "handoff")
    if manifest is None:
        raise HandoffError(404, f"run {run_id} has no bundle", NOT_FOUND_HINT)
    manifest["run"] = store.get_state(run_id).to_dict()
    return manifest


class BundleHandler(HandoffAPIHandler):
    @web.authenticated
    @authorized
    def get(self, run_id: str) -> None:
        self.run_summary(run_id)
        self.send(bundle_manifest(self, run_id))


async def compute_diff(handler: _Base, run_id: str) -> dict[str, Any]:
    store = handler.handoff.store
    before = store.manifest(run_id, "handoff")
    if before is None:
        raise HandoffError(404, f"run {run_id} has no handoff bundle", NOT_FOUND_HINT)
    after = store.manifest(run_id, "checkpoint") or before
    from handoff_magic.diff import diff_manifests
    return await asyncio.to_thread(diff_manifests, before, after, handler.handoff.blobs.read)


class DiffHandler(HandoffAPIHandler):
    @web.authenticated
    @authorized
    async def get(self, run_id: str) -> None:
        self.run_summary(run_id)
        self.send(await compute_diff(self, run_id))


# ---------------------------------------------------------------------------------------------
# HTML pages
# ---------------------------------------------------------------------------------------------
class PageHandler(_Base, JupyterHandler):
    """HTML pages: login redirect when not authenticated, XSRF on form posts."""

    def render(self, name: str, **ns: Any) -> None:  # type: ignore[override]
        env = self.settings["handoff_jinja2_env"]
        sandbox = getattr(self.handoff, "sandbox_state", None)
        html = env.get_template(name).render(
            base_url=self.base_url.rstrip("/"), xsrf=Markup(self.xsrf_form_html()),
            sandbox_warning=sandbox.warning if sandbox is not None else "",
            labels=STATUS_LABELS, **ns)   # the widget's and the terminal's words for a status
        self.finish(html)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, HandoffError):
            self.set_status(status_code)
            self.render("error.html", status=status_code, error=exc.error, hint=exc.hint)
            return
        super().write_error(status_code, **kwargs)


class RunListPage(PageHandler):
    @web.authenticated
    @authorized
    def get(self) -> None:
        self.render("runs.html", runs=self.handoff.store.list_runs())


def _steps(events: list[Any], limit: int = 30) -> list[dict[str, Any]]:
    """Recent steps for the page: the agent's words, its code and a short output.

    Only code runs show as tool calls; plan updates, questions and the finish have their own
    places on the page, so their tool echoes are left out.
    """
    steps: list[dict[str, Any]] = []
    for ev in events:
        d = ev.data or {}
        if ev.type == "assistant" and d.get("text"):
            steps.append({"kind": "words", "text": str(d["text"])})
        elif ev.type == "tool_call" and d.get("name") == "run_python":
            args = d.get("arguments") or {}
            code = args.get("code") if isinstance(args, dict) else None
            steps.append({"kind": "code", "name": "python", "text": str(code or "")})
        elif ev.type == "tool_result" and d.get("name") == "run_python":
            text = str(d.get("content") or "")
            steps.append({"kind": "error" if d.get("is_error") else "output",
                          "text": text if len(text) <= 1500 else text[:1500] + "\n…"})
        elif ev.type in ("question", "answer", "error", "interrupted"):
            text = str(d.get("question") or d.get("answer") or d.get("error") or d.get("reason") or "")
            step = {"kind": ev.type, "text": text}
            if ev.type == "question" and any(s == step for s in steps[-3:]):
                continue   # asked again when the run resumed: one question, shown once
            steps.append(step)
        elif ev.type == "refusal":
            steps.append({"kind": "refusal", "text": f"The model refused: {d.get('text', '')}"})
        elif ev.type == "compacted":
            steps.append({"kind": "compacted", "text": describe_compaction(d)})
    return steps[-limit:]


class RunPage(PageHandler):
    @web.authenticated
    @authorized
    def get(self, run_id: str) -> None:
        run = self.run_summary(run_id)
        events = self.handoff.store.events(run_id, 0, limit=None)
        base = self.base_url.rstrip("/")
        self.render("run.html", run=run, steps=_steps(events), usage=describe_usage(run.get("usage")),
                    # also right after an answer: the run is still "waiting_input" until the
                    # runner takes it, and the page must not look stuck (or invite a 2nd answer)
                    refresh=run["status"] in ("queued", "restoring", "running") or (
                        run["status"] == "waiting_input" and self.get_argument("message", "") == "Answer sent"),
                    # "Answer sent" is news until the run has ended (a bookmarked page must not keep it)
                    message="" if (self.get_argument("message", "") == "Answer sent"
                                   and run["status"] in TERMINAL_STATUSES) else self.get_argument("message", ""),
                    local={"notebook": f"{base}/lab/tree/handoff-runs/{run_id}/result.ipynb",
                           "diff_json": f"{base}/handoff/api/runs/{run_id}/diff",
                           "diff_html": f"{base}/handoff/runs/{run_id}/diff",
                           "answer": f"{base}/handoff/runs/{run_id}/answer",
                           "cancel": f"{base}/handoff/runs/{run_id}/cancel",
                           "list": f"{base}/handoff/runs"})


class RunAnswerForm(PageHandler):
    @web.authenticated
    @authorized
    async def post(self, run_id: str) -> None:
        summary = self.run_summary(run_id)
        text = self.get_body_argument("answer", "").strip()
        if not text:
            raise HandoffError(400, "the answer was empty", "type an answer and send it again")
        await submit_answer(self, run_id, summary, text[:MAX_ANSWER_CHARS])
        self.redirect(f"{self.base_url.rstrip('/')}/handoff/runs/{run_id}?message=Answer+sent")


class RunCancelForm(PageHandler):
    @web.authenticated
    @authorized
    async def post(self, run_id: str) -> None:
        summary = self.run_summary(run_id)
        if summary["status"] not in TERMINAL_STATUSES:
            async with runner_errors(run_id):
                await self.runner().cancel(run_id)
        self.redirect(f"{self.base_url.rstrip('/')}/handoff/runs/{run_id}?message=Run+cancelled")


class DiffPage(PageHandler):
    @web.authenticated
    @authorized
    async def get(self, run_id: str) -> None:
        run = self.run_summary(run_id)
        diff = await compute_diff(self, run_id)
        from handoff_magic.diff import render_diff_html  # escapes everything it renders
        base = self.base_url.rstrip("/")
        self.render("diff.html", run=run, diff_html=Markup(render_diff_html(diff)),
                    diff_json_url=f"{base}/handoff/api/runs/{run_id}/diff")


def handlers() -> list[tuple[str, type, dict[str, Any]] | tuple[str, type]]:
    return [
        (rf"{API}/blobs/missing", MissingBlobsHandler),
        (rf"{API}/blobs/(?P<sha>[^/]+)", BlobHandler),
        (rf"{API}/runs", RunsHandler),
        (rf"{API}/runs/{RUN_ID}", RunHandler),
        (rf"{API}/runs/{RUN_ID}/events", EventsHandler),
        (rf"{API}/runs/{RUN_ID}/answer", AnswerHandler),
        (rf"{API}/runs/{RUN_ID}/cancel", CancelHandler),
        (rf"{API}/runs/{RUN_ID}/pull", PullHandler),
        (rf"{API}/runs/{RUN_ID}/bundle", BundleHandler),
        (rf"{API}/runs/{RUN_ID}/diff", DiffHandler),
        (r"/handoff/runs", RunListPage),
        (rf"/handoff/runs/{RUN_ID}", RunPage),
        (rf"/handoff/runs/{RUN_ID}/answer", RunAnswerForm),
        (rf"/handoff/runs/{RUN_ID}/cancel", RunCancelForm),
        (rf"/handoff/runs/{RUN_ID}/diff", DiffPage),
    ]
