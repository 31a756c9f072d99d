"""Where the agent's code runs. The loop only sees the Executor protocol and ExecResult.

InProcessExecutor runs code in *this* kernel through ``shell.run_cell`` so it lands in
In/Out and its outputs (prints, plots, tables, errors) appear to the user as usual; at the
same time it tees the streams, the display publisher, the display hook and the traceback
display into nbformat v4 output dicts for the model and the result notebook.
"""
from __future__ import annotations

import _thread
import base64
import ctypes
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Protocol, cast, runtime_checkable

ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text)


@dataclass
class ExecResult:
    """What running one piece of code produced. status: ok|error|interrupted|timeout|dead."""
    status: str
    stdout: str = ""
    stderr: str = ""
    result: str | None = None                 # text/plain of the last expression's value
    outputs: list[dict[str, Any]] = field(default_factory=list)  # nbformat v4 output dicts
    error: dict[str, Any] | None = None       # {"ename", "evalue", "traceback": [lines]}
    execution_count: int | None = None


@runtime_checkable
class Executor(Protocol):
    def execute(self, code: str, timeout: float | None = None) -> ExecResult: ...
    def interrupt(self) -> None: ...


def _jsonable_bundle(data: dict[str, Any]) -> dict[str, Any]:
    """Mime bundle as nbformat wants it: str values, binary images base64-encoded."""
    out: dict[str, Any] = {}
    for mime, value in (data or {}).items():
        if isinstance(value, (bytes, bytearray)):
            value = base64.b64encode(bytes(value)).decode("ascii")
        out[mime] = value
    return out


class _Tee:
    """Stands in for sys.stdout/sys.stderr: forwards everything, records the writer thread's text."""

    def __init__(self, inner: Any, sink: Callable[[str], None], owner: "_Capture") -> None:
        self._inner = inner
        self._sink = sink
        self._owner = owner

    def write(self, text: Any) -> Any:
        if isinstance(text, str) and self._owner.recording():
            self._sink(text)
        return self._inner.write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Capture:
    """Installs the tees for one execution and turns what they saw into nbformat outputs."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.thread = threading.get_ident()
        self.outputs: list[dict[str, Any]] = []
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.result: str | None = None
        self.error_stb: list[str] | None = None
        self._quiet = 0          # >0 while IPython prints a result/traceback itself
        self._undo: list[Callable[[], None]] = []

    def recording(self) -> bool:
        return self._quiet == 0 and threading.get_ident() == self.thread

    def _stream(self, name: str, text: str) -> None:
        if not text:
            return
        (self.stdout if name == "stdout" else self.stderr).append(text)
        last = self.outputs[-1] if self.outputs else None
        if last and last.get("output_type") == "stream" and last.get("name") == name:
            last["text"] += text
        else:
            self.outputs.append({"output_type": "stream", "name": name, "text": text})

    # -- hooks ------------------------------------------------------------------------
    def _patch(self, obj: Any, attr: str, wrapper: Callable[..., Any]) -> None:
        had_own = attr in getattr(obj, "__dict__", {})
        previous = obj.__dict__.get(attr) if had_own else None
        setattr(obj, attr, wrapper)

        def undo() -> None:
            if had_own:
                setattr(obj, attr, previous)
            else:
                try:
                    delattr(obj, attr)
                except AttributeError:
                    pass
        self._undo.append(undo)

    def install(self) -> None:
        shell = self.shell
        for name in ("stdout", "stderr"):
            inner = getattr(sys, name)
            tee = _Tee(inner, partial(self._stream, name), self)
            setattr(sys, name, tee)

            def undo(name: str = name, inner: Any = inner, tee: Any = tee) -> None:
                if getattr(sys, name) is tee:   # user code may have replaced it; leave theirs
                    setattr(sys, name, inner)
            self._undo.append(undo)

        pub = getattr(shell, "display_pub", None)
        if pub is not None:
            publish = pub.publish

            def tee_publish(data: Any = None, metadata: Any = None, *args: Any, **kwargs: Any) -> Any:
                if self.recording() and not kwargs.get("update") and isinstance(data, dict):
                    self.outputs.append({"output_type": "display_data", "data": _jsonable_bundle(data),
                                         "metadata": dict(metadata or {})})
                self._quiet += 1   # plain IPython prints text/plain of displays to stdout
                try:
                    return publish(data, metadata, *args, **kwargs)
                finally:
                    self._quiet -= 1
            self._patch(pub, "publish", tee_publish)

            clear = getattr(pub, "clear_output", None)
            if clear is not None:
                def tee_clear(*args: Any, **kwargs: Any) -> Any:
                    if self.recording():
                        self.outputs.clear()
                    return self._quietly(clear)(*args, **kwargs)   # plain IPython prints escapes
                self._patch(pub, "clear_output", tee_clear)

        hook = getattr(shell, "displayhook", None)
        if hook is not None and hasattr(hook, "write_format_data"):
            write = hook.write_format_data

            def tee_write(format_dict: Any, md_dict: Any = None) -> Any:
                if self.recording() and isinstance(format_dict, dict):
                    data = _jsonable_bundle(format_dict)
                    self.outputs.append({"output_type": "execute_result", "data": data,
                                         "metadata": dict(md_dict or {}),
                                         "execution_count": getattr(shell, "execution_count", None)})
                    self.result = data.get("text/plain") if isinstance(data.get("text/plain"), str) else None
                self._quiet += 1
                try:
                    return write(format_dict, md_dict)
                finally:
                    self._quiet -= 1
            self._patch(hook, "write_format_data", tee_write)
            for quiet_name in ("write_output_prompt", "finish_displayhook"):
                if hasattr(hook, quiet_name):   # plain IPython prints "Out[n]: " itself
                    self._patch(hook, quiet_name, self._quietly(getattr(hook, quiet_name)))

        show = shell._showtraceback

        def tee_showtraceback(etype: Any, evalue: Any, stb: Any) -> Any:
            if self.recording():
                lines = list(stb) if isinstance(stb, (list, tuple)) else [str(stb)]
                self.error_stb = lines
                self.outputs.append({"output_type": "error", "ename": getattr(etype, "__name__", str(etype)),
                                     "evalue": str(evalue), "traceback": lines})
            self._quiet += 1
            try:
                return show(etype, evalue, stb)
            finally:
                self._quiet -= 1
        self._patch(shell, "_showtraceback", tee_showtraceback)

    def _quietly(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._quiet += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._quiet -= 1
        return wrapper

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> int:
    """Raise ``exc`` in another thread at its next bytecode (None clears a pending one)."""
    obj = ctypes.py_object(exc) if exc is not None else None
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), obj)


class _PythonHandlesSigint:
    """While agent code runs in the main thread, Python turns SIGINT into KeyboardInterrupt, as
    ipykernel does around every request. Where Python does not handle SIGINT (ignored: IPython
    started from a background shell or a service inherits SIG_IGN; or SIG_DFL), interrupts and
    timeouts would otherwise do nothing (``_thread.interrupt_main`` is a no-op then) and runaway
    code would hold the kernel for good."""

    def __init__(self) -> None:
        self._saved: Any = None
        self._swapped = False

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread() and \
                not callable(signal.getsignal(signal.SIGINT)):
            self._saved = signal.signal(signal.SIGINT, signal.default_int_handler)
            self._swapped = True

    def __exit__(self, *exc: object) -> None:
        if self._swapped:   # None: a handler not set from Python, which leaves SIG_DFL
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._saved is None else self._saved)
            self._swapped = False


def _interrupt_main_thread() -> None:
    """Like a kernel interrupt: a real SIGINT wakes blocking calls (sleep, socket reads).

    Only when Python handles SIGINT; otherwise (SIG_DFL would kill the process) fall back to
    a simulated one, which takes effect at the next bytecode.
    """
    if callable(signal.getsignal(signal.SIGINT)):
        signal.pthread_kill(cast(int, threading.main_thread().ident), signal.SIGINT)  # it has started
    else:
        _thread.interrupt_main()


class InProcessExecutor:
    """Runs the agent's code in this kernel's user namespace, from any thread.

    ``interrupt()`` makes the running code raise KeyboardInterrupt: via a simulated SIGINT
    when it runs in the main thread, via PyThreadState_SetAsyncExc in a background thread
    (which takes effect at the next Python bytecode, so not inside a long C call).
    """

    def __init__(self, shell: Any = None) -> None:
        if shell is None:
            from IPython import get_ipython
            shell = get_ipython()
        if shell is None:
            raise RuntimeError("InProcessExecutor needs an IPython shell: run it inside Jupyter or IPython")
        self.shell = shell
        self._run_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._running_thread: int | None = None
        self._interrupted = False
        self._timed_out = False

    def __repr__(self) -> str:
        return f"<InProcessExecutor {type(self.shell).__name__}>"

    def secret_values(self) -> set[str]:
        """Values of secret-named user variables that also look like keys, for redaction.

        ``join_key = "customer_id"`` must not blank out a column name in every result the
        model reads, so namespace values count only when key-like: 12+ characters, no
        whitespace, letters and digits. (Secret environment values are always redacted.)
        """
        from ..secrets import secret_values
        return {v for v in secret_values(self.shell.user_ns, environ={})
                if len(v) >= 12 and not any(c.isspace() for c in v)
                and any(c.isdigit() for c in v) and any(c.isalpha() for c in v)}

    @property
    def running(self) -> bool:
        return self._running_thread is not None

    def interrupt(self) -> None:
        with self._state_lock:
            tid = self._running_thread
            if tid is None:
                return
            self._interrupted = True
            if tid == threading.main_thread().ident:
                _interrupt_main_thread()
            else:
                _set_async_exc(tid, KeyboardInterrupt)

    def _on_timeout(self) -> None:
        self._timed_out = True
        self.interrupt()

    def execute(self, code: str, timeout: float | None = None) -> ExecResult:
        with self._run_lock:
            capture = _Capture(self.shell)
            self._interrupted = self._timed_out = False
            timer = threading.Timer(timeout, self._on_timeout) if timeout else None
            escaped: BaseException | None = None
            res: Any = None
            capture.install()
            try:
                with self._state_lock:
                    self._running_thread = threading.get_ident()
                if timer:
                    timer.daemon = True
                    timer.start()
                try:
                    with _PythonHandlesSigint():
                        res = self.shell.run_cell(code, store_history=True)
                finally:
                    with self._state_lock:
                        self._running_thread = None
                        if threading.get_ident() != threading.main_thread().ident:
                            _set_async_exc(threading.get_ident(), None)  # drop a late interrupt
                    if timer:
                        timer.cancel()
            except KeyboardInterrupt as exc:   # landed in IPython's own machinery, not user code
                escaped = exc
            finally:
                capture.uninstall()
            return self._result(res, capture, escaped)

    def _result(self, res: Any, cap: _Capture, escaped: BaseException | None) -> ExecResult:
        exc = escaped
        if res is not None:
            exc = exc or res.error_before_exec or res.error_in_exec
        error = None
        if exc is not None:
            tb = [strip_ansi(line) for line in cap.error_stb] if cap.error_stb else []
            error = {"ename": type(exc).__name__, "evalue": str(exc), "traceback": tb}
            if not cap.error_stb:
                cap.outputs.append({"output_type": "error", **error})
        if self._timed_out and isinstance(exc, KeyboardInterrupt):
            status = "timeout"
        elif isinstance(exc, KeyboardInterrupt):
            status = "interrupted"
        elif exc is not None:
            status = "error"
        else:
            status = "ok"
        count = None
        if res is not None and getattr(res, "execution_count", None) is not None:
            count = res.execution_count
            for out in cap.outputs:
                if out.get("output_type") == "execute_result":
                    out["execution_count"] = count
        return ExecResult(status=status, stdout="".join(cap.stdout), stderr="".join(cap.stderr),
                          result=cap.result, outputs=cap.outputs, error=error, execution_count=count)
