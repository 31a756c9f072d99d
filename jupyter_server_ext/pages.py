"""The HTML status pages under ``/handoff/runs``: the run list, one run's page (plan, question,
recent steps, answer and cancel forms) and its diff. Same auth as the API (login redirect,
XSRF on form posts); errors render ``error.html`` (http.py).
"""
from __future__ import annotations

from typing import Any

from jupyter_server.auth.decorator import authorized
from markupsafe import Markup
from tornado import web

from handoff_magic.state import TERMINAL_STATUSES, Event, describe_compaction, describe_usage

from .api import parse_form_answer
from handoff_magic.diff import render_diff_html
from .http import PageHandler
from .workspace import PAGES, RUN_ID_PATTERN, page_links

RUN_ID = rf"(?P<run_id>{RUN_ID_PATTERN})"
REFRESHING = ("queued", "restoring", "running")   # statuses whose page reloads itself


def _steps(events: list[Event], limit: int = 30) -> list[dict[str, Any]]:
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
            said = d.get("question") or d.get("answer") or d.get("error") or d.get("reason")
            step = {"kind": ev.type, "text": str(said or "")}
            if ev.type == "question" and any(s == step for s in steps[-3:]):
                continue   # asked again when the run resumed: one question, shown once
            steps.append(step)
        elif ev.type == "refusal":
            steps.append({"kind": "refusal", "text": f"The model refused: {d.get('text', '')}"})
        elif ev.type == "compacted":
            steps.append({"kind": "compacted", "text": describe_compaction(d)})
    return steps[-limit:]


class RunListPage(PageHandler):
    @web.authenticated
    @authorized
    def get(self) -> None:
        self.render("runs.html", runs=self.service.store.list_runs())


class RunPage(PageHandler):
    @web.authenticated
    @authorized
    def get(self, run_id: str) -> None:
        run = self.service.summary(run_id)
        events = self.service.store.events(run_id, 0, limit=None)
        links = page_links(self.base_url, run_id)
        message = self.get_argument("message", "")
        self.render("run.html", run=run, steps=_steps(events), usage=describe_usage(run.get("usage")),
                    # also right after an answer: the run is still "waiting_input" until the
                    # runner takes it, and the page must not look stuck (or invite a 2nd answer)
                    refresh=run["status"] in REFRESHING or (
                        run["status"] == "waiting_input" and message == "Answer sent"),
                    # "Answer sent" is news until the run has ended (a bookmarked page must not keep it)
                    message="" if message == "Answer sent" and run["status"] in TERMINAL_STATUSES else message,
                    local={"notebook": links["notebook"], "diff_json": links["diff"],
                           "diff_html": links["diff_page"], "answer": links["answer"],
                           "cancel": links["cancel"], "list": links["list"]})


class RunAnswerForm(PageHandler):
    @web.authenticated
    @authorized
    async def post(self, run_id: str) -> None:
        self.service.summary(run_id)
        await self.service.answer(run_id, parse_form_answer(self.get_body_argument("answer", "")))
        self.redirect(page_links(self.base_url, run_id)["status_page"] + "?message=Answer+sent")


class RunCancelForm(PageHandler):
    @web.authenticated
    @authorized
    async def post(self, run_id: str) -> None:
        if self.service.summary(run_id)["status"] not in TERMINAL_STATUSES:
            await self.service.cancel(run_id)
        self.redirect(page_links(self.base_url, run_id)["status_page"] + "?message=Run+cancelled")


class DiffPage(PageHandler):
    @web.authenticated
    @authorized
    async def get(self, run_id: str) -> None:
        run = self.service.summary(run_id)
        diff = await self.service.diff(run_id)
        self.render("diff.html", run=run, diff_html=Markup(render_diff_html(diff)),  # escaped, then sanitised
                    diff_json_url=page_links(self.base_url, run_id)["diff"])


def routes() -> list[tuple[str, type]]:
    return [
        (PAGES, RunListPage),
        (rf"{PAGES}/{RUN_ID}", RunPage),
        (rf"{PAGES}/{RUN_ID}/answer", RunAnswerForm),
        (rf"{PAGES}/{RUN_ID}/cancel", RunCancelForm),
        (rf"{PAGES}/{RUN_ID}/diff", DiffPage),
    ]
