"""The runner: one run\x27s lifecycle split into collaborators (see DESIGN "Layout")."""
