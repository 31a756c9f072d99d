"""The notebook side of a run: shell.py (the shell, output routing), run.py (LocalRun and this
kernel's registry), widget.py + widget_css.py (RunWidget, the live view local and remote runs
share) and render.py (what that view shows, as pure functions of the run)."""
