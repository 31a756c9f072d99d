"""The maintenance command's old module path, kept so scripts and cron jobs go on working:
``python -m jupyter_server_ext.runner gc --data-dir DIR`` is
``python -m jupyter_server_ext.run.checkpoints gc --data-dir DIR``."""
from __future__ import annotations

from .run.checkpoints import main

if __name__ == "__main__":
    raise SystemExit(main())
