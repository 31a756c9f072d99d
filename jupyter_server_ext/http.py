"""HTTP plumbing shared by every route: Jupyter Server auth, JSON bodies, and errors.

Every route is authenticated by Jupyter Server (``@web.authenticated``) and authorized on the
resource ``handoff`` (``@authorized``). Errors are the one place where the server's error root
(``errors.ServerError``) meets HTTP: ``status_of`` picks the status, API routes answer
``{"error": what happened, "hint": what to do, **extra}`` and pages render ``error.html``.
"""
from __future__ import annotations

import asyncio
import json
import logging
from types import TracebackType
from typing import Any

from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from markupsafe import Markup
from tornado import web

from handoff_magic.state import STATUS_LABELS

from .errors import BadRequest, BlobTooLarge, Conflict, NotFound, RunFailure, ServerError, TooLarge, Unavailable
from .service import RunService

log = logging.getLogger(__name__)

RESOURCE = "handoff"
MAX_JSON_BYTES = 64 * 1024 * 1024     # a manifest for a huge namespace is still far below this

# most specific first: the first class an error is an instance of decides its status
_STATUS: tuple[tuple[type[ServerError], int], ...] = (
    (BlobTooLarge, 413),
    (TooLarge, 413),
    (BadRequest, 400),
    (NotFound, 404),
    (Conflict, 409),
    (RunFailure, 409),   # a request the run's own failure refused (e.g. pull of a broken run)
    (Unavailable, 503),
)

_DEFAULT_HINTS = {
    400: "check the request against the jupyter-handoff API",
    403: "send a valid Jupyter Server token (Authorization: token …) or log in; "
         "for form posts include the _xsrf field",
    404: "check the URL; list runs with GET /handoff/api/runs or %reattach",
    405: "this route does not accept that method",
    413: "the request is too large for this server",
    500: "this is a bug in jupyter-handoff; the server log has the traceback",
    503: "runs cannot execute on this server now; the server log says why",
}


def status_of(exc: ServerError) -> int:
    """The HTTP status a server error answers with (500 for one no rule names)."""
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 500)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _Errors:
    """Error logging and status for both handler kinds: a ServerError is the client's to act on
    (a warning, no traceback), anything else is a bug (the traceback is logged)."""

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        if isinstance(value, ServerError):
            log.warning("jupyter-handoff: %d %s: %s", status_of(value), self._request_summary(),  # type: ignore[attr-defined]
                        value.message)
            return
        super().log_exception(typ, value, tb)  # type: ignore[misc]

    def _error(self, status_code: int, kwargs: dict[str, Any]) -> tuple[int, BaseException | None]:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ServerError):
            status_code = status_of(exc)
            self.set_status(status_code)  # type: ignore[attr-defined]
        return status_code, exc


class HandoffHandler(ExtensionHandlerMixin):
    """``auth_resource`` makes ``@authorized`` check the resource ``handoff``; ``service`` is the
    one RunService of this server (app.py puts it in the tornado settings)."""

    auth_resource = RESOURCE

    @property
    def service(self) -> RunService:
        service: RunService = self.settings["handoff_service"]
        return service


class ApiHandler(_Errors, HandoffHandler, APIHandler):
    """JSON in, JSON out, JSON errors."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        status_code, exc = self._error(status_code, kwargs)
        if isinstance(exc, ServerError):
            reply: dict[str, Any] = {"error": exc.message, "hint": exc.hint or "", **exc.extra}
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
            raise TooLarge(f"request body is {len(body)} bytes, over the {MAX_JSON_BYTES} byte limit",
                           "send less data per request")
        if not body.strip():
            return {}
        try:  # NaN/Infinity are not JSON; stored state must stay readable by SQLite's json1
            data = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise BadRequest(f"request body is not valid JSON ({str(exc)[:200]})",
                             "send a JSON object; the upload may have been cut off, retry it") from None
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object", "wrap the fields in {...}")
        return data

    def send(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data, ensure_ascii=False))


class PageHandler(_Errors, HandoffHandler, JupyterHandler):
    """HTML pages: login redirect when not authenticated, XSRF on form posts."""

    def render(self, name: str, **ns: Any) -> None:  # type: ignore[override]
        env = self.settings["handoff_jinja2_env"]
        html = env.get_template(name).render(
            base_url=self.base_url.rstrip("/"), xsrf=Markup(self.xsrf_form_html()),
            sandbox_warning=self.service.sandbox.warning if self.service.sandbox is not None else "",
            labels=STATUS_LABELS, **ns)   # the widget's and the terminal's words for a status
        self.finish(html)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        status_code, exc = self._error(status_code, kwargs)
        if isinstance(exc, ServerError):
            self.render("error.html", status=status_code, error=exc.message, hint=exc.hint or "")
            return
        super().write_error(status_code, **kwargs)


async def is_authorized(handler: JupyterHandler, action: str) -> bool:
    """``@authorized``'s check, for code that runs before the method (a streamed body)."""
    result = handler.authorizer.is_authorized(handler, handler.current_user, action, RESOURCE)
    if asyncio.iscoroutine(result):
        result = await result
    return bool(result)
