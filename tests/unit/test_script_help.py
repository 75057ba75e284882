"""Every command-line script under scripts/ renders its --help and says something about each flag.

The tile-tuning script runs only on a GPU, where a crash in --help (a bare % in a help string breaks argparse's
formatting) wastes a GPU session; here it is caught on the CPU. Each script is run in-process with runpy, which
executes its module body and main() up to argparse's exit; none touches CUDA before parsing.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
WITH_FLAGS = sorted(str(p.relative_to(SCRIPTS)) for p in SCRIPTS.rglob("*.py") if "ArgumentParser" in p.read_text())


def test_the_scripts_are_found() -> None:
    assert WITH_FLAGS == ["demo/demo_heldout.py", "demo/make_demo_data.py", "gpu_prefill_tiles.py"]


@pytest.mark.parametrize("name", WITH_FLAGS)
def test_help_renders_and_explains_each_flag(name: str, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    parsers: list[argparse.ArgumentParser] = []
    real_parse = argparse.ArgumentParser.parse_args

    def spy(self: argparse.ArgumentParser, *a: object, **kw: object) -> object:
        parsers.append(self)
        return real_parse(self, *a, **kw)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    monkeypatch.setattr(sys, "argv", [Path(name).name, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    assert done.value.code in (0, None), capsys.readouterr().err
    assert parsers, f"{name} never parsed its arguments"
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    for action in parsers[0]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{name}: {action.option_strings} has no help text"
            assert action.option_strings[-1] in out
