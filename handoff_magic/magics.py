"""IPython magics: %snapshot, %agent/%%agent, %handoff, %reattach, %pull, %runs.

Each magic is a thin parser; the work lives in capture/restore, agent and remote modules.
"""
from __future__ import annotations

import shlex
from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class


class UsageError(Exception):
    pass


@magics_class
class HandoffMagics(Magics):
    @line_magic
    def snapshot(self, line: str) -> Any:
        """%snapshot save PATH | %snapshot load PATH — save or restore this kernel's state."""
        from IPython.core.error import UsageError as IPyUsageError

        from . import load_state, save_state

        args = shlex.split(line)
        if len(args) != 2 or args[0] not in ("save", "load"):
            raise IPyUsageError("usage: %snapshot save PATH  or  %snapshot load PATH")
        action, path = args
        if action == "save":
            return save_state(path, self.shell)
        return load_state(path, self.shell)
