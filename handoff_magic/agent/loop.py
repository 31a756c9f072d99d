"""The provider-neutral agent loop: ask the model, run the tools it called, record everything.

The same loop runs in the user's kernel (InProcessExecutor) and in the Jupyter Server
(KernelExecutor). All it knows of the world is a RunState, a Provider and an Executor, and
every change it makes goes through ``state.emit`` and the ``on_event`` callback.

(Over 400 lines: a step, its budgets, pause/interrupt and the tool dispatch are one state machine.)
"""
from __future__ import annotations

import base64
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from ..state import Event, Message, PlanStep, RunState, ToolCall, ToolResult, Usage
from .context import (
    ContextManager,
    compaction_event_data,
    context_window,
    usage_from_estimate,
)
from .executors import ExecResult, Executor, strip_ansi
from .pricing import cost_of, price_for
from .providers.base import Provider, ProviderError
from .tools import TOOLS, ToolArgumentError, validate_arguments

log = logging.getLogger(__name__)

SYSTEM_PROMPT = """\
You are a data-science agent working inside the user's live Jupyter kernel.

- `run_python` executes code in that kernel: the user's variables, imports and working directory
  are there, and what you define stays there for them. Your code and its outputs appear in their
  notebook and In/Out history, so write clear, idiomatic code they would be glad to keep.
- Inspect before you change: look at the data (shape, dtypes, head, files on disk) before
  transforming it. Never overwrite the user's variables or files without need; prefer new names.
- Keep a short plan with `update_plan` (3-7 steps) at the start, and update it as each step
  becomes active, done or failed, so the user can follow along.
- Work in small steps and read each result before the next. If code fails, read the traceback,
  fix the cause and try again.
- Ask the user (`ask_user`) only when truly blocked: a decision only they can make, or
  information you cannot find in the kernel or on disk.
- The run may be paused, handed off to another machine and resumed: the kernel state is restored
  there. If a tool result says a call was interrupted, check the state and redo what is needed.
- Never print secrets (keys, tokens, passwords), even if you find them.
- When the goal is met, call `finish` with a short summary: what you did, the variables and files
  that hold the results, and any caveats.
"""

MAX_RESULT_CHARS = 8000        # what the model sees of one run_python call
MAX_TRACEBACK_LINES = 40
MAX_OUTPUTS_BYTES = 2_000_000  # rich outputs kept in the state per call

RETRY_WORDS = ("", "retry", "continue", "go", "go on", "resume")
CONTINUE_TEXT = "Continue with the task."
MAX_OVERFLOW_RETRIES = 4       # "context too long" answers met by compacting harder, per step


def trim(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    """Keep the head and the tail of long text: both usually matter (setup and the error)."""
    if len(text) <= limit:
        return text
    head = int(limit * 0.6)
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters trimmed] ...\n{text[-tail:]}"


def _image_size(mime: str, data: Any) -> str:
    if mime != "image/png" or not isinstance(data, str):
        return ""
    try:
        raw = base64.b64decode(data[:64] + "=" * (-len(data[:64]) % 4), validate=False)
        if raw[:8] == b"\x89PNG\r\n\x1a\n":
            w, h = struct.unpack(">II", raw[16:24])
            return f" {w}x{h}"
    except (ValueError, struct.error):
        pass
    return ""


def summarize_output(out: dict[str, Any]) -> str:
    """One rich output as the model should see it: text as text, the rest as a label."""
    data = out.get("data") or {}
    rich = [m for m in data if m != "text/plain"]
    labels = []
    for mime in rich:
        if mime.startswith("image/"):
            labels.append(f"[{mime}{_image_size(mime, data[mime])}]")
        elif mime.startswith("application/vnd.jupyter.widget"):
            labels.append("[widget]")
        else:
            labels.append(f"[{mime}]")
    text = data.get("text/plain")
    if isinstance(text, list):
        text = "".join(text)
    parts = [" ".join(labels)] if labels else []
    if isinstance(text, str) and text and not (rich and text.startswith("<") and text.endswith(">")):
        parts.append(trim(text, 2000))
    return "\n".join(parts)


def format_exec_result(res: ExecResult) -> tuple[str, bool]:
    """The run_python tool result text for the model, and whether it is an error."""
    parts: list[str] = []
    if res.stdout:
        parts.append("stdout:\n" + trim(strip_ansi(res.stdout), 4000))
    if res.stderr:
        parts.append("stderr:\n" + trim(strip_ansi(res.stderr), 2000))
    for out in res.outputs:
        if out.get("output_type") == "display_data":
            shown = summarize_output(out)
            if shown:
                parts.append("display:\n" + shown)
        elif out.get("output_type") == "execute_result":
            shown = summarize_output(out)
            if shown:
                parts.append(f"Out[{res.execution_count or ''}]:\n" + shown)
    if res.result is not None and not any(o.get("output_type") == "execute_result" for o in res.outputs):
        parts.append("Out:\n" + trim(res.result, 2000))
    if res.error:
        tb = [strip_ansi(line).rstrip("\n") for line in res.error.get("traceback") or []]
        lines = "\n".join(tb).splitlines()
        if len(lines) > MAX_TRACEBACK_LINES:
            lines = ["... (earlier traceback lines trimmed)"] + lines[-MAX_TRACEBACK_LINES:]
        parts.append(f"{res.error.get('ename', 'Error')}: {res.error.get('evalue', '')}")
        if lines:
            parts.append("traceback:\n" + trim("\n".join(lines), 3000))
    header = {
        "ok": "ok",
        "error": "error",
        "interrupted": "interrupted by the user before it finished; its effects may be partial",
        "timeout": "stopped: it ran past the time limit; its effects may be partial",
        "dead": "the kernel died while running this code; variables defined in it are lost",
    }.get(res.status, res.status)
    body = "\n".join(parts) if parts else "(no output)"
    return trim(f"[{header}]\n{body}"), res.status != "ok"


def _cap_outputs(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep rich outputs, but replace any single big payload once the total passes the cap."""
    import json
    total = len(json.dumps(outputs, default=str))
    if total <= MAX_OUTPUTS_BYTES:
        return outputs
    capped = []
    for out in outputs:
        out = dict(out)
        if isinstance(out.get("data"), dict):
            data = {}
            for mime, value in out["data"].items():
                size = len(value) if isinstance(value, str) else 0
                data[mime] = value if size < 100_000 or mime == "text/plain" else f"[{mime} omitted: {size} bytes]"
            out["data"] = data
        capped.append(out)
    return capped


INTERRUPTED_RESULT = ("[interrupted] This call was cut off before it finished (the run was interrupted, "
                      "or the kernel or server stopped). Its effects may be partial: check the state and "
                      "redo it if it is still needed.")
SKIPPED_RESULT = "[not run] An earlier call in the same turn stopped the turn; call this again if still needed."


class AgentLoop:
    """Runs one agent over ``state`` until it finishes, asks, pauses or fails.

    Budgets (steps, seconds, tokens, cost) count from each ``run()`` call, so ``%agent
    continue`` after a budget pause gets a fresh allowance. ``exec_timeout`` (seconds) bounds
    one run_python call; ``context_tokens`` overrides the model's context window; ``prices``
    adds entries to the price table (see pricing.py).
    ``before_stop(why)`` is called in the loop's thread just before the run stops to ask
    (``"question"``, before the question is announced) or to end (``"completed"`` /
    ``"failed"``, before that status): the server's runner saves a checkpoint there, so nothing
    is announced ahead of the state it depends on.
    """

    def __init__(self, state: RunState, provider: Provider, executor: Executor, *,
                 on_event: Callable[[RunState, Event], None] | None = None,
                 should_pause: Callable[[], bool] | None = None,
                 system_prompt: str | None = None,
                 exec_timeout: float | None = None,
                 context_tokens: int | None = None,
                 prices: dict[str, dict[str, float]] | None = None,
                 before_stop: Callable[[str], None] | None = None) -> None:
        self.state = state
        self.provider = provider
        self.executor = executor
        self.on_event = on_event
        self.should_pause = should_pause
        self.system_prompt = system_prompt or SYSTEM_PROMPT
        self.exec_timeout = exec_timeout
        self.before_stop = before_stop
        self.tools = TOOLS
        self._t0 = time.monotonic()
        self._steps_here = 0
        self._usage_here = Usage()
        if not state.model:
            state.model = getattr(provider, "spec", "") or ""
        self.spec = getattr(provider, "spec", "") or state.model
        self.prices = prices
        price_for(self.spec, prices)          # a broken HANDOFF_PRICES is an error now, not mid-run
        self.context = ContextManager(provider, window=context_window(self.spec, context_tokens),
                                      system=self.system_prompt, tools=self.tools)
        self.context.calibrate(state.messages)
        if hasattr(provider, "on_retry"):
            provider.on_retry = self._model_retrying

    def _model_retrying(self, what: str) -> None:
        """A model call is being retried: say so (a status event keeping status running)."""
        self._status(self.state.status, reason=self._redact(f"model call failed: {what}"))

    # -- events ------------------------------------------------------------------------
    def _notify(self, event: Event | None) -> None:
        if event is not None and self.on_event is not None:
            self.on_event(self.state, event)

    def _emit(self, type: str, **data: Any) -> Event:
        event = self.state.emit(type, **data)
        self._notify(event)
        return event

    def _status(self, status: str, **data: Any) -> None:
        if status in ("completed", "failed") and self.before_stop is not None:
            self.before_stop(status)
        self._notify(self.state.set_status(status, **data))

    # -- secrets -----------------------------------------------------------------------
    def _secret_values(self) -> set[str]:
        from .. import secrets
        values = set(secrets.secret_values())
        for source in (self.executor, self.provider):
            fn = getattr(source, "secret_values", None)
            if callable(fn):
                values |= set(fn())
        return {v for v in values if v}

    def _redact(self, obj: Any) -> Any:
        from .. import secrets
        values = self._secret_values()
        return secrets.redact_obj(obj, values) if values else obj

    # -- conversation bookkeeping ----------------------------------------------------------
    def _last_assistant(self) -> tuple[int, Message] | None:
        for i in range(len(self.state.messages) - 1, -1, -1):
            m = self.state.messages[i]
            if m.role == "assistant":
                return i, m
            if m.role == "user":
                return None
        return None

    def _dangling_calls(self) -> list[ToolCall]:
        """Tool calls of the last assistant message that have no result yet."""
        found = self._last_assistant()
        if found is None:
            return []
        i, msg = found
        done = {r.call_id for m in self.state.messages[i + 1:] if m.role == "tool" for r in m.tool_results}
        return [c for c in msg.tool_calls if c.id not in done]

    def _add_result(self, result: ToolResult, *, announce: bool = True) -> None:
        """File a result in the tool message after the last assistant message, in call order."""
        found = self._last_assistant()
        msgs = self.state.messages
        if found is not None and found[0] + 1 < len(msgs) and msgs[found[0] + 1].role == "tool":
            tool_msg = msgs[found[0] + 1]
        else:
            tool_msg = Message(role="tool")
            msgs.append(tool_msg)
        tool_msg.tool_results.append(result)
        if found is not None:
            order = {c.id: n for n, c in enumerate(found[1].tool_calls)}
            tool_msg.tool_results.sort(key=lambda r: order.get(r.call_id, len(order)))
        if announce:
            self._emit("tool_result", id=result.call_id, name=result.name, content=result.content,
                       is_error=result.is_error, outputs=result.outputs)

    def _close_dangling(self, content: str = INTERRUPTED_RESULT) -> None:
        for call in self._dangling_calls():
            self._add_result(ToolResult(call_id=call.id, name=call.name, content=content, is_error=True))

    # -- run ---------------------------------------------------------------------------
    def run(self, answer: str | None = None) -> RunState:
        """Run until finish, a question, a pause, a budget, an interrupt or a failure."""
        st = self.state
        if st.status in ("cancelled", "pulled", "handed_off"):
            raise RuntimeError(f"run {st.id} is {st.status}; it cannot be continued here")
        if st.status == "completed" and answer is None:
            return st
        self._t0 = time.monotonic()
        self._steps_here = 0
        self._usage_here = Usage()
        try:
            if not self._prepare(answer):
                return st
            self._status("running")
            while True:
                reason = self._stop_reason()
                if reason:
                    self._pause(reason)
                    return st
                if not self._step():
                    return st
        except KeyboardInterrupt:
            self._close_dangling()
            self._pause("interrupted by the user; the plan and conversation are kept, "
                        "continue the run to resume", interrupted=True)
            return st
        except Exception as exc:  # a bug here must not lose the run: keep state, say so
            log.exception("agent loop failed")
            self._close_dangling()
            st.error = f"the agent loop failed: {type(exc).__name__}: {exc}"
            self._emit("error", error=st.error,
                       hint="this is a bug in jupyter-handoff; the plan and conversation are kept, "
                            "continuing the run retries the last step")
            self._status("failed", reason=st.error)
            return st

    def _prepare(self, answer: str | None) -> bool:
        """Seed the goal, give pending tool calls their results; False if still waiting."""
        st = self.state
        if not st.messages:
            st.messages.append(Message(role="user", text=st.goal))
        used = False
        pending = self._dangling_calls()
        asks = [c for c in pending if c.name == "ask_user"]
        if asks and answer is None:
            question = str(asks[0].arguments.get("question", "")) or st.question or "waiting for your answer"
            if st.status != "waiting_input" or st.question != question:
                self._ask(question, reason="waiting for the user's answer")
            return False
        for call in pending:
            if call.name == "ask_user" and not used:
                used = True
                self._emit("answer", answer=answer)
                self._add_result(ToolResult(call_id=call.id, name=call.name,
                                            content=f"The user answered: {answer}"))
            else:
                self._add_result(ToolResult(call_id=call.id, name=call.name,
                                            content=INTERRUPTED_RESULT, is_error=True))
        if answer is not None and not used:
            self._emit("answer", answer=answer)
            if answer.strip().lower() not in RETRY_WORDS:
                st.messages.append(Message(role="user", text=answer))
        last = st.messages[-1]
        if last.role == "assistant" and not last.tool_calls:
            # after a refusal or a plain-text reply the next turn must be the user's: resending
            # a history that ends with the model's own words would get the same reply
            st.messages.append(Message(role="user", text=CONTINUE_TEXT))
        st.question = None
        st.error = None
        if st.status == "completed":
            st.summary = None
        return True

    def _stop_reason(self) -> str | None:
        st = self.state
        if self.should_pause is not None and self.should_pause():
            return "pause requested; continue the run to resume"
        if self._steps_here >= st.budgets.max_steps:
            return (f"step budget reached ({st.budgets.max_steps} model turns); "
                    "continue the run to allow more steps")
        elapsed = time.monotonic() - self._t0
        if elapsed >= st.budgets.max_seconds:
            return (f"time budget reached ({elapsed:.0f}s of {st.budgets.max_seconds:g}s); "
                    "continue the run to allow more time")
        used = self._usage_here
        if st.budgets.max_tokens is not None and used.total_tokens >= st.budgets.max_tokens:
            return (f"token budget reached ({used.total_tokens:,} of {st.budgets.max_tokens:,} tokens); "
                    "continue the run to allow as many more")
        if st.budgets.max_cost is not None and (used.cost or 0.0) >= st.budgets.max_cost:
            return (f"cost budget reached (${used.cost or 0.0:.4f} of ${st.budgets.max_cost:g}); "
                    "continue the run to allow as much more")
        return None

    def _pause(self, reason: str, interrupted: bool = False) -> None:
        if interrupted:
            self._emit("interrupted", reason=reason)
        self._status("paused", reason=reason)

    def _ask(self, question: str, reason: str) -> None:
        self.state.question = question
        if self.before_stop is not None:
            self.before_stop("question")
        self._emit("question", question=question)
        self._status("waiting_input", reason=reason)

    def _provider_failed(self, exc: ProviderError) -> None:
        st = self.state
        st.error = self._redact(exc.message)
        hint = self._redact(exc.hint or "")
        self._emit("error", error=st.error, hint=hint)
        self._ask(f"The model call failed: {st.error}" + (f" ({hint})" if hint else "")
                  + ". Answer 'retry' to try again, or type instructions to send with the retry.",
                  reason="model call failed")

    def _step(self) -> bool:
        """One model turn and the tools it called. False when the run stops here."""
        st = self.state
        try:
            reply = self._complete()
        except ProviderError as exc:
            self._provider_failed(exc)
            return False
        except Exception as exc:  # a provider bug is still a model-call failure, not a crash
            log.exception("model provider failed")
            self._provider_failed(ProviderError(f"{type(exc).__name__}: {exc}",
                                                "this looks like a bug in the provider"))
            return False
        if not isinstance(reply, Message) or reply.role != "assistant":
            self._provider_failed(ProviderError(f"the provider returned {reply!r}, not an assistant message",
                                                "this is a bug in the provider"))
            return False
        st.steps += 1
        self._steps_here += 1
        st.messages.append(reply)
        self._emit("usage", step=st.steps, kind="step", **self._usage_data(reply.usage))
        if reply.refusal:
            self._emit("refusal", text=reply.text)
            self._ask(f"The model refused: {reply.text} Rephrase the task, or answer 'continue' to ask again.",
                      reason="the model refused")
            return False
        if reply.text:
            self._emit("assistant", text=reply.text)
        for call in reply.tool_calls:
            self._emit("tool_call", id=call.id, name=call.name, arguments=call.arguments)
        if not reply.tool_calls:
            self._ask(reply.text or "The model stopped without calling a tool. What should it do next?",
                      reason="the model replied without calling a tool")
            return False

        stop: str | None = None
        ask_question = ""
        for call in reply.tool_calls:
            if stop is not None:
                self._add_result(ToolResult(call_id=call.id, name=call.name, content=SKIPPED_RESULT,
                                            is_error=True))
                continue
            try:
                args = validate_arguments(call.name, call.arguments)
            except ToolArgumentError as exc:
                self._add_result(ToolResult(call_id=call.id, name=call.name,
                                            content=f"[error] {exc}", is_error=True))
                continue
            if call.name == "run_python":
                if self._run_python(call, args["code"]) == "interrupted":
                    stop = "interrupted"
            elif call.name == "update_plan":
                st.plan = [PlanStep(text=s["text"], status=s.get("status", "pending")) for s in args["steps"]]
                self._emit("plan", steps=[{"text": p.text, "status": p.status} for p in st.plan])
                done = sum(p.status == "done" for p in st.plan)
                self._add_result(ToolResult(call_id=call.id, name=call.name,
                                            content=f"Plan updated: {len(st.plan)} steps, {done} done."))
            elif call.name == "ask_user":
                stop = "ask"
                ask_question = args["question"]
            elif call.name == "finish":
                stop = "finish"
                st.summary = args["summary"]
                self._add_result(ToolResult(call_id=call.id, name=call.name, content="Run finished."))

        if stop == "ask":
            self._ask(ask_question, reason="the agent asked a question")
            return False
        if stop == "finish":
            self._emit("finish", summary=st.summary)
            self._status("completed")
            return False
        if stop == "interrupted":
            self._pause("interrupted by the user while code was running; continue the run to resume",
                        interrupted=True)
            return False
        return True

    # -- the model call, its context and its usage -----------------------------------------
    def _complete(self) -> Message:
        """One model reply, the request kept inside the context window: compact when near
        it, and when the provider still says "too long", learn its limit, compact, retry."""
        st = self.state
        for attempt in range(MAX_OVERFLOW_RETRIES + 1):
            if attempt or self.context.needs_compaction(st.messages):
                self._compact(forced=attempt > 0)
            sent = self.context.view(st.messages)
            try:
                reply = self.provider.complete(self.system_prompt, sent, self.tools)
            except ProviderError as exc:
                if not exc.context_overflow or attempt == MAX_OVERFLOW_RETRIES:
                    raise
                self.context.overflowed(exc, sent)
                self._emit("context_overflow", error=self._redact(exc.message), limit=self.context.limit)
                continue
            if isinstance(reply, Message):
                self._count(reply, sent)
                self.context.observe(sent, reply.usage)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def _count(self, reply: Message, sent: list[Message]) -> None:
        """Price the reply's usage (estimate it if the provider reported none) and add it up."""
        usage = reply.usage or usage_from_estimate(self.context, sent, reply)
        usage.cost = cost_of(usage, self.spec, self.prices)
        reply.usage = usage
        self.state.usage.add(usage)
        self._usage_here.add(usage)

    def _usage_data(self, usage: Usage | None) -> dict[str, Any]:
        return {"usage": usage.to_dict() if usage else None, "total": self.state.usage.to_dict()}

    def _compact(self, forced: bool) -> None:
        done = self.context.compact(self.state)
        if done is None:
            return
        if done.usage is not None:
            done.usage.cost = cost_of(done.usage, self.spec, self.prices)
            self.state.usage.add(done.usage)
            self._usage_here.add(done.usage)
        self._emit("compacted", **compaction_event_data(done), forced=forced,
                   window=self.context.limit, **self._usage_data(done.usage))

    def _run_python(self, call: ToolCall, code: str) -> str:
        try:
            res = self.executor.execute(code, timeout=self.exec_timeout)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the executor itself failed (e.g. kernel gone): tell the model
            log.exception("executor failed")
            res = ExecResult(status="dead" if "dead" in str(exc).lower() else "error",
                             error={"ename": type(exc).__name__, "evalue": str(exc), "traceback": []})
        content, is_error = format_exec_result(res)
        content = self._redact(content)
        outputs = self._redact(_cap_outputs(res.outputs))
        self._add_result(ToolResult(call_id=call.id, name=call.name, content=content,
                                    is_error=is_error, outputs=outputs))
        return res.status
