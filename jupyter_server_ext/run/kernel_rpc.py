"""The one way the server calls code in a run's kernel and gets a value back.

A call is a throwaway function (its body is ours, its argument ``a`` is JSON) executed silently,
whose return value the kernel publishes as ``display_data`` of the private MIME type ``MIME``;
no name is left in the user's namespace and nothing reaches the kernel's stdout. ``kernel_call``
puts the arguments in the code as a JSON literal; ``kernel_call_bulk`` sends them in the
execute_request's content (``ARGS_KEY``), which IPython never parses (30x faster for megabytes
of base64). The restore, checkpoints and both bundle transports all use this protocol.
"""
from __future__ import annotations

import json
from typing import Any, Protocol

from ..errors import KernelGone, TransportError

MIME = "application/x.jupyter-handoff+json"
ARGS_KEY = "jupyter_handoff_args"
_FUNC = "_handoff_xfer_"


class ExecResultLike(Protocol):
    """What a call needs from an executor's result (``agent.executors.ExecResult``)."""
    status: str
    error: dict[str, Any] | None
    outputs: list[dict[str, Any]]


def _wrap(body: str, argument: str) -> str:
    indented = "\n".join("    " + line for line in body.strip().splitlines())
    return (f"def {_FUNC}(a):\n{indented}\n"
            "try:\n"
            "    __import__('IPython.display', fromlist=['_']).publish_display_data("
            f"{{{MIME!r}: {_FUNC}({argument})}})\n"
            "finally:\n"
            f"    del {_FUNC}\n")


def kernel_call(body: str, args: dict[str, Any]) -> str:
    """Code that runs ``body`` with ``a = args`` and publishes its JSON-able return value."""
    return _wrap(body, f"__import__('json').loads({json.dumps(args)!r})")


def kernel_call_bulk(body: str) -> str:
    """Like ``kernel_call``, but ``a`` is the execute_request content's ``ARGS_KEY``; a kernel or
    gateway that drops that key answers with a ``KeyError``."""
    return _wrap(body, f"get_ipython().kernel.get_parent()['content'][{ARGS_KEY!r}]")


def check(res: ExecResultLike, what: str) -> None:
    """Raise for a call that did not succeed: ``KernelGone`` if the kernel died, else
    ``TransportError`` with the kernel's exception."""
    if res.status == "dead":
        raise KernelGone(f"the kernel died while {what}", "the run restores its last checkpoint in a new kernel")
    if res.status != "ok":
        err = res.error or {}
        raise TransportError(f"{what} failed in the kernel: {err.get('ename', res.status)}: {err.get('evalue', '')}",
                             "see the Jupyter Server log; the kernel needs jupyter-handoff installed "
                             "(same version as the server)")


def kernel_result(res: ExecResultLike) -> Any:
    """The value a call published, from the execution's outputs."""
    for out in reversed(res.outputs or []):
        data = out.get("data") or {}
        if out.get("output_type") == "display_data" and MIME in data:
            value = data[MIME]
            return json.loads(value) if isinstance(value, str) else value
    raise TransportError("the kernel published no transfer result",
                         "the kernel's output was lost; see the Jupyter Server log")
