"""Every server knob is a real, documented trait: set through Jupyter's config it takes effect,
and the README's settings table lists it."""
from __future__ import annotations

from pathlib import Path

import pytest
from traitlets.config import Config

from jupyter_server_ext.app import HandoffApp
from jupyter_server_ext.settings import HandoffSettings

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("name, value", [("exec_timeout", 12.5), ("gc_interval", 0.0), ("keep_checkpoints", 7),
                                         ("max_concurrent_runs", 5), ("warm_kernels", 1)])
def test_config_files_and_the_command_line_set_the_knob(name: str, value: object) -> None:
    from_file = HandoffApp(config=Config({"HandoffApp": {name: value}}))
    assert getattr(from_file, name) == value
    cli = HandoffApp()
    cli.parse_command_line([f"--HandoffApp.{name}={value}"])
    assert getattr(cli, name) == value


def test_every_knob_has_help_and_a_row_in_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    table = [line for line in readme.splitlines() if line.startswith("| `c.HandoffApp.")]
    names = HandoffSettings.class_trait_names(config=True)
    assert names, "no configurable traits found"
    for name in names:
        assert HandoffSettings.class_traits()[name].help, f"c.HandoffApp.{name} has no help text"
        assert any(f"`c.HandoffApp.{name}`" in row or f"`{name}`" in row for row in table), \
            f"c.HandoffApp.{name} is missing from the README settings table"
