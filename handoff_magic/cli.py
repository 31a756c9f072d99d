"""``jupyter handoff``: the runs of a handoff server from a terminal, a script or over SSH.

A Jupyter subcommand like ``jupyter server extension`` (a traitlets ``JupyterApp`` with
subcommands). The server and token come from the same place as for the magics:
``--url``/``--token``, else ``HANDOFF_SERVER_URL``/``HANDOFF_TOKEN``, else
``~/.jupyter/handoff.json``.

Exit codes (a contract for scripts; README "From the terminal"):

====  ==============================================================================
0     done: the request worked; for ``follow``: the run completed
1     the request failed: server unreachable, token refused, no such run, ...
2     wrong arguments
3     ``follow``: the run failed
4     ``follow``: the run was cancelled
5     ``follow``: the run waits for an answer (``jupyter handoff answer ID TEXT``)
6     ``follow``: the run was pulled back into a notebook
130   ``follow`` detached with Ctrl-C; the run goes on on the server
====  ==============================================================================
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import webbrowser
from typing import Any

from jupyter_core.application import JupyterApp
from traitlets import Bool, Float, Int, Unicode

from . import __version__
from .errors import HandoffError
from .remote.follow import RemoteRun, cancel, follow
from .remote.http import HandoffClient
from .remote.views import DiffView, RunList, event_text, plan_text
from .state import STATUS_LABELS, Event, describe_usage

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_CANCELLED = 4
EXIT_WAITING = 5
EXIT_PULLED = 6
EXIT_DETACHED = 130
FOLLOW_EXIT = {"completed": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED,
               "waiting_input": EXIT_WAITING, "pulled": EXIT_PULLED}



# -- what a terminal shows --------------------------------------------------------------------






def event_lines(ev: Event) -> list[str]:
    """``event_text`` for a terminal: the event's number in front, so ``--after N`` can resume."""
    lines = event_text(ev)
    return [f"{ev.seq:>4} {line}" if i == 0 else f"     {line}" for i, line in enumerate(lines)]


def summary_text(run: dict[str, Any]) -> str:
    """`jupyter handoff show`: status, plan, waiting question, usage and links of one run."""
    rid = run.get("id", "")
    status = str(run.get("status") or "")
    lines = [f"run {rid}: {STATUS_LABELS.get(status, status)}",
             f"goal: {run.get('goal') or ''}"]
    facts = [f"steps: {run.get('steps', 0)}"]
    if run.get("model"):
        facts.append(f"model: {run['model']}")
    if run.get("updated"):
        facts.append("updated: " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["updated"])))
    lines.append("   ".join(facts))
    usage = describe_usage(run.get("usage"))
    if usage:
        lines.append(f"usage: {usage}")
    if run.get("plan"):
        lines.append("plan:")
        lines += ["  " + line for line in plan_text(run["plan"])]
    if status == "waiting_input":
        lines.append(f"question: {run.get('question') or '(no question text)'}")
        lines.append(f"  answer it: jupyter handoff answer {rid} \"YOUR ANSWER\"")
    if run.get("summary"):
        lines.append(f"summary: {run['summary']}")
    if run.get("error"):
        lines.append(f"error: {run['error']}")
    links = run.get("links") or {}
    if links:
        lines.append("links:")
        for key in ("status_page", "notebook", "diff"):
            if links.get(key):
                lines.append(f"  {key.replace('_', ' ')}: {links[key]}")
    return "\n".join(lines)


def ending_text(run_id: str, status: str, state: Any) -> str:
    """The last lines of `follow`: why it stopped and what to do next."""
    label = STATUS_LABELS.get(status, status)
    if status == "waiting_input":
        return (f"run {run_id} is {label}: {state.question or '(no question text)'}\n"
                f"answer it: jupyter handoff answer {run_id} \"YOUR ANSWER\"")
    if status == "completed":
        return f"run {run_id} completed: {state.summary or ''}".rstrip(": ")
    if status == "failed":
        return f"run {run_id} failed: {state.error or 'see its events'}"
    return f"run {run_id} is {label}"


# -- following --------------------------------------------------------------------------------




# -- the commands -----------------------------------------------------------------------------
class UsageError(Exception):
    """Wrong arguments: printed with the command's usage line, exit code 2."""


class RunCommand(JupyterApp):
    """What every subcommand shares: the server, the token, error handling, exit codes."""

    version = __version__
    usage = ""          # e.g. "jupyter handoff show ID"
    server_url = Unicode("", config=True,
                         help="The Jupyter Server with jupyter-handoff (else HANDOFF_SERVER_URL, "
                              "else server_url in ~/.jupyter/handoff.json).")
    token = Unicode("", config=True,
                    help="Its Jupyter Server token (else HANDOFF_TOKEN, else token in handoff.json; "
                         "`jupyter server list` on the server shows it).")
    json_output = Bool(False, config=True, help="Print the server's JSON instead of text (for scripts).")

    aliases = {**JupyterApp.aliases, "url": "RunCommand.server_url", "to": "RunCommand.server_url",
               "token": "RunCommand.token"}
    flags = {**JupyterApp.flags,
             "json": ({"RunCommand": {"json_output": True}}, "Print JSON instead of text.")}

    def client(self) -> HandoffClient:
        return HandoffClient(self.server_url or None, self.token or None)

    def args(self, low: int, high: int | None = None) -> list[str]:
        """The positional arguments, between ``low`` and ``high`` of them."""
        args = [str(a) for a in self.extra_args]
        if len(args) < low or (high is not None and len(args) > high):
            raise UsageError(f"usage: {self.usage}")
        return args

    def print_json(self, data: Any) -> None:
        print(json.dumps(data, indent=2, ensure_ascii=False))

    def run(self) -> int:
        """The command's work; returns the exit code."""
        raise NotImplementedError

    def start(self) -> None:
        try:
            code = self.run()
        except UsageError as exc:
            print(exc, file=sys.stderr)
            self.exit(EXIT_USAGE)
        except HandoffError as exc:
            print(f"error: {exc.message or exc}", file=sys.stderr)
            if exc.hint:
                print(f"hint: {exc.hint}", file=sys.stderr)
            self.exit(EXIT_ERROR)
        self.exit(code)


class ListCommand(RunCommand):
    name = "jupyter handoff list"
    description = "List the runs on the server: id, status, steps, last update, goal."
    usage = "jupyter handoff list [--json]"

    def run(self) -> int:
        self.args(0, 0)
        with self.client() as cl:
            runs = cl.list_runs()
            if self.json_output:
                self.print_json(runs)
            else:
                print(RunList(cl.url, runs).text("jupyter handoff show ID tells more about one"))
        return EXIT_OK


class ShowCommand(RunCommand):
    name = "jupyter handoff show"
    description = "Show one run: status, plan, usage, the question it waits on, links."
    usage = "jupyter handoff show ID [--json]"

    def run(self) -> int:
        (run_id,) = self.args(1, 1)
        with self.client() as cl:
            run = cl.get_run(run_id)
        if self.json_output:
            self.print_json(run)
        else:
            print(summary_text(run))
        return EXIT_OK


class FollowCommand(RunCommand):
    name = "jupyter handoff follow"
    description = ("Print the run's steps as they happen, until it ends or waits for an answer. "
                   "Exit code: 0 completed, 3 failed, 4 cancelled, 5 waiting for input, 6 pulled "
                   "back, 130 detached with Ctrl-C (the run goes on).")
    usage = "jupyter handoff follow ID [--after=N]"
    after = Int(0, config=True, help="Show only the events after this number (0: the whole run).")
    aliases = {**RunCommand.aliases, "after": "FollowCommand.after"}

    def run(self) -> int:
        (run_id,) = self.args(1, 1)

        def show(ev: Event) -> None:
            for line in event_lines(ev):
                print(line, flush=True)

        try:
            with self.client() as cl:
                remote = follow(cl, run_id, show, after=self.after)
        except KeyboardInterrupt:
            print(f"\ndetached from run {run_id}; it goes on on the server "
                  f"(jupyter handoff follow {run_id} picks it up again)", file=sys.stderr, flush=True)
            return EXIT_DETACHED
        print(ending_text(run_id, remote.status, remote.state), flush=True)
        return FOLLOW_EXIT.get(remote.status, EXIT_OK)


class AnswerCommand(RunCommand):
    name = "jupyter handoff answer"
    description = "Answer the question a waiting run asked (TEXT '-' reads the answer from stdin)."
    usage = "jupyter handoff answer ID TEXT"

    def run(self) -> int:
        run_id, *words = self.args(2)
        text = sys.stdin.read() if words == ["-"] else " ".join(words)
        with self.client() as cl:
            cl.answer(run_id, text)   # the run takes it up at once; its status follows
        print(f"answer sent to run {run_id}; jupyter handoff follow {run_id} shows what it does next")
        return EXIT_OK


class CancelCommand(RunCommand):
    name = "jupyter handoff cancel"
    description = "Cancel a run: its kernel stops, its last checkpoint and notebook stay."
    usage = "jupyter handoff cancel ID"
    wait = Float(60.0, config=True, help="Seconds to wait for the run to show it was cancelled.")

    def run(self) -> int:
        (run_id,) = self.args(1, 1)
        with self.client() as cl:
            status = cancel(cl, run_id, self.wait)
        print(f"run {run_id} is {STATUS_LABELS.get(status, status)}")
        return EXIT_OK


class DiffCommand(RunCommand):
    name = "jupyter handoff diff"
    description = "What the run changed since the handoff: files (unified diffs) and variables."
    usage = "jupyter handoff diff ID [--json]"

    def run(self) -> int:
        (run_id,) = self.args(1, 1)
        with self.client() as cl:
            diff = cl.diff(run_id)
        if self.json_output:
            self.print_json(diff)
        else:
            print(DiffView(diff, run_id, cl.url))
        return EXIT_OK


class OpenCommand(RunCommand):
    name = "jupyter handoff open"
    description = ("Print the URL of the run's result notebook (in the server's JupyterLab) and "
                   "open it in a browser when this machine has one.")
    usage = "jupyter handoff open ID [--no-browser]"
    browser = Bool(True, config=True, help="Open the URL in a browser (when there is a display).")
    flags = {**RunCommand.flags,
             "no-browser": ({"OpenCommand": {"browser": False}}, "Only print the URL.")}

    def run(self) -> int:
        (run_id,) = self.args(1, 1)
        with self.client() as cl:
            remote = RemoteRun(cl, run_id)
            remote.refresh()            # the run exists, and its links use the public URL
            url = remote.notebook_url()
        print(url)
        if self.browser and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                             or os.environ.get("BROWSER") or sys.platform in ("darwin", "win32")):
            webbrowser.open(url)
        return EXIT_OK


class McpCommand(RunCommand):
    name = "jupyter handoff mcp"
    description = ("Serve the runs to another agent over MCP (stdio): list, show, follow, answer, "
                   "cancel, diff, and start_run to delegate a task with files to the server.")
    usage = "jupyter handoff mcp"
    wait_cap = Float(120.0, config=True, help="Longest a follow_run tool call waits, in seconds.")

    def run(self) -> int:
        self.args(0, 0)
        from .mcp import serve
        serve(self.server_url or None, self.token or None, max_wait=self.wait_cap)
        return EXIT_OK


EXAMPLES = textwrap.dedent("""\
    jupyter handoff list                      # the runs on HANDOFF_SERVER_URL
    jupyter handoff follow 3f2a9c1d7e00       # live steps; exit 5 when it asks a question
    jupyter handoff answer 3f2a9c1d7e00 "use the 2024 data"
    jupyter handoff diff 3f2a9c1d7e00
    jupyter handoff mcp                       # for Claude Code, Cursor, Jupyter AI ...
""")


class HandoffCommand(JupyterApp):
    """``jupyter handoff``: dispatches to its subcommands."""

    name = "jupyter-handoff"
    version = __version__
    description = ("Follow and steer jupyter-handoff runs on a Jupyter Server from a terminal. "
                   "Server and token: --url/--token, else HANDOFF_SERVER_URL/HANDOFF_TOKEN, else "
                   "~/.jupyter/handoff.json.")
    examples = EXAMPLES
    subcommands = {
        "list": (ListCommand, ListCommand.description),
        "show": (ShowCommand, ShowCommand.description),
        "follow": (FollowCommand, FollowCommand.description),
        "answer": (AnswerCommand, AnswerCommand.description),
        "cancel": (CancelCommand, CancelCommand.description),
        "diff": (DiffCommand, DiffCommand.description),
        "open": (OpenCommand, OpenCommand.description),
        "mcp": (McpCommand, McpCommand.description),
    }

    def start(self) -> None:
        super().start()   # runs the subcommand (and raises NoStart) when one was given
        self.print_help()
        print(f"\nerror: name a subcommand: {', '.join(self.subcommands)}", file=sys.stderr)
        self.exit(EXIT_USAGE)


main = HandoffCommand.launch_instance

if __name__ == "__main__":
    main()
