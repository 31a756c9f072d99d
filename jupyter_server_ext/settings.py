"""Every knob of the server extension, as a documented trait (DESIGN "Configuration").

``HandoffApp`` inherits ``HandoffSettings``, so users write ``c.HandoffApp.model = ...`` or
``--HandoffApp.model=...``; the extension's parts receive the configured object typed as
``HandoffSettings`` and read nothing else. A new knob is one trait here (its type, default and
help) plus its row in the README table; the code that uses it reads ``settings.<name>``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir
from traitlets import Bool, Enum, Float, Integer, List, TraitError, Unicode, Union, default
from traitlets.config import Configurable

from .run.sandbox import MODES as SANDBOX_MODES
from .run.sandbox import default_memory_limit, parse_size

# a separator before the next URL: whitespace, or a comma followed by "scheme://" (a comma inside
# a URL, e.g. mailto://...?to=a@x.org,b@x.org, stays part of that URL)
_URL_SEP = re.compile(r"\s+|,\s*(?=[A-Za-z][A-Za-z0-9+.\-]*://)")


def split_urls(value: object) -> list[str]:
    """Notification targets from a list, a JSON list string, or comma/whitespace-separated URLs.

    ``--HandoffApp.notify_urls='["a://x", "b://y"]'`` or ``=a://x,b://y`` given once on the command
    line arrives as one string; read naively, every target but one would be lost without a word.
    """
    items = [value] if isinstance(value, str) else list(value or [])   # type: ignore[call-overload]
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TraitError(f"HandoffApp.notify_urls: {item!r} is not a URL string")
        text = item.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                raise TraitError(f"HandoffApp.notify_urls: {text[:80]!r} looks like a JSON list but is "
                                 f"not valid JSON ({exc}); write it as '[\"json://host/hook\", "
                                 f"\"mailto://...\"]' or as comma-separated URLs") from None
            urls.extend(split_urls(parsed))
            continue
        urls.extend(u for u in _URL_SEP.split(text) if u)
    return urls


class UrlList(List[str]):
    """A List of URL strings that also accepts one string holding several URLs (see split_urls)."""

    def validate(self, obj: Any, value: Any) -> list[Any] | None:
        return super().validate(obj, split_urls(value) if isinstance(value, (str, list, tuple)) else value)


class HandoffSettings(Configurable):
    """The configuration of jupyter-handoff's server side (``c.HandoffApp.<name>``)."""

    # storage and limits
    data_dir = Unicode(help="Where runs (SQLite) and uploaded chunks live. "
                            "Default: <jupyter data dir>/handoff.").tag(config=True)
    max_bundle_bytes = Integer(8 * 1024**3, help="Largest bundle (sum of its stored chunks) a run may "
                                                 "reference; larger ones get 413.").tag(config=True)
    max_chunk_bytes = Integer(256 * 1024**2, help="Largest single uploaded chunk.").tag(config=True)
    direct_uploads = Bool(True, help="Write uploaded chunks with O_DIRECT (straight to the disk, not "
                                     "through the page cache) where data_dir's file system allows it: "
                                     "less server CPU, and they are on the disk when the upload ends. "
                                     "Turn off for a data_dir on a network file system.").tag(config=True)
    max_events_wait = Float(60.0, help="Longest a long-poll for events may wait, in seconds.").tag(config=True)
    gc_interval = Float(6 * 3600.0, help="Seconds between scheduled collections of uploaded chunks no "
                                         "run references (0 = only on demand: python -m "
                                         "jupyter_server_ext.runner gc).").tag(config=True)
    keep_checkpoints = Integer(3, help="Checkpoints kept per unfinished run (a finished run keeps its "
                                       "last one); older ones are dropped so their chunks can be "
                                       "collected.").tag(config=True)

    # the model
    model = Unicode("", help="Model spec used for remote runs (openai:MODEL, anthropic:MODEL, "
                             "scripted:PATH); empty = the run's own model preference.").tag(config=True)
    model_base_url = Unicode("", help="Endpoint for the model provider (else the SDK's *_BASE_URL "
                                      "env var).").tag(config=True)
    model_api_key_env = Unicode("", help="Name of the environment variable holding the model key "
                                         "(else the SDK convention, e.g. OPENAI_API_KEY).").tag(config=True)

    # runs and their kernels
    max_concurrent_runs = Integer(2, help="Runs executing at once; others wait as 'queued'.").tag(config=True)
    kernel_name = Unicode("python3", help="Kernel spec for remote runs.").tag(config=True)
    keep_kernel = Bool(False, help="Keep a finished run's kernel alive (for inspection).").tag(config=True)
    result_notebook_starts_kernel = Bool(False, help="Let the cloud's JupyterLab start a kernel when a "
                                                     "result-notebook link opens result.ipynb (off: the "
                                                     "page reads the report; its kernel selector starts "
                                                     "one on demand).").tag(config=True)
    warm_kernels = Integer(0, help="Spare run kernels (0 or 1) kept booted, each sandboxed like a run's "
                                   "on an empty workspace of its own, so a handoff skips kernel "
                                   "start-up: a fresh run adopts the spare (never shared, never "
                                   "reused) and the next one boots. Off by default: a spare is a "
                                   "standing kernel on every server the extension loads in. "
                                   "Same-disk kernels only (not through a gateway).").tag(config=True)
    warm_imports = List(Unicode(), ["numpy", "pandas"],
                        help="Modules a spare kernel (warm_kernels) imports ahead of its run, so a "
                             "restore that needs them skips their import (pandas: ~1 s). Only "
                             "sys.modules changes, nothing is bound in the run's namespace; modules "
                             "missing on this server are skipped.").tag(config=True)
    exec_timeout = Float(3600.0, help="Longest one run_python call of a remote run may take, in "
                                      "seconds; then it is interrupted and the agent told "
                                      "(0 = no limit).").tag(config=True)
    stuck_after = Float(help="Notify 'stuck' (with links to answer, cancel or pull the run back) when "
                             "a running run shows no progress for this many seconds. Default: "
                             "exec_timeout + 5 minutes; 0 turns it off.").tag(config=True)
    context_tokens = Integer(0, help="The model's context window in tokens, for models jupyter-handoff "
                                     "does not know (0: the known window, else HANDOFF_CONTEXT_TOKENS, "
                                     "else 128000).").tag(config=True)
    max_tokens_per_run = Integer(0, help="Token budget (input + output) of a remote run before it "
                                         "pauses and asks whether to go on (0: no limit).").tag(config=True)
    transport = Unicode("auto", help="How bundles reach run kernels: 'shared' (same disk), 'kernel' "
                                     "(over the kernel's channels, for gateways), 'auto' (kernel "
                                     "when --gateway-url is set).").tag(config=True)

    # the run kernel's sandbox (run/sandbox.py)
    sandbox = Enum(list(SANDBOX_MODES), "auto",
                   help="Isolation of run kernels: 'auto' and 'bwrap' start them under bubblewrap "
                        "(workspace the only writable place; server files, other runs, home, other "
                        "processes and the network invisible) and refuse runs when bwrap does not "
                        "work here; 'none' runs them unsandboxed (a warning on the status pages). "
                        "Gateway kernels are isolated by the gateway.").tag(config=True)
    kernel_network = Bool(False, help="Let sandboxed run kernels use the network (e.g. to "
                                      "download data); off by default.").tag(config=True)
    kernel_memory_limit = Union([Integer(), Unicode()], default_value="",
                                help="Address-space limit of a sandboxed run kernel: bytes or "
                                     "'4G', '512M'; '' = half this machine's memory; 0 = none. "
                                     "Past it the kernel gets MemoryError and the run an 'error' "
                                     "event.").tag(config=True)
    kernel_max_processes = Integer(512, help="Most processes a sandboxed run kernel may have "
                                             "(a pids cgroup where writable; 0 = no cap).").tag(config=True)

    # telling the user
    notify_urls = UrlList(Unicode(), help="apprise URLs notified when a run completes, fails, is "
                                          "cancelled or needs input: a list, a JSON list string, or "
                                          "comma/whitespace-separated URLs.").tag(config=True)
    notify_retry_seconds = Float(2.0, help="First retry delay for a failed notification; doubles per "
                                           "attempt up to 5 minutes.").tag(config=True)
    public_url = Unicode("", help="Base URL used in links (notifications, status pages). "
                                  "Default: this server's URL + base_url.").tag(config=True)

    def memory_limit_bytes(self) -> int:
        """``kernel_memory_limit`` in bytes (0: no limit)."""
        value = self.kernel_memory_limit
        if value == "":
            return default_memory_limit()
        try:
            return parse_size(value)
        except ValueError as exc:
            raise TraitError(f"HandoffApp.kernel_memory_limit: {exc}") from None

    @default("stuck_after")
    def _default_stuck_after(self) -> float:
        return float(self.exec_timeout) + 300.0

    @default("data_dir")
    def _default_data_dir(self) -> str:
        return str(Path(jupyter_data_dir()) / "handoff")
