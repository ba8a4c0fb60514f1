"""Every example in README.md runs: `embedfit ...` lines of bash blocks and the Python blocks, in order."""

from __future__ import annotations

import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from embedfit.cli import app, main

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    lines = []
    for lang, body in BLOCKS:
        if lang == "bash":
            lines += [ln.split("  #")[0].strip() for ln in body.splitlines() if ln.startswith("embedfit ")]
    return lines


def test_every_command_is_documented() -> None:
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        assert f"### embedfit {name}" in README, f"README lacks a section for `embedfit {name}`"


@pytest.mark.timeout(600)
def test_readme_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "data"))
    try:
        runpy.run_path(str(ROOT / "data" / "make_demo.py"), run_name="not_main")["main"](
            [str(tmp_path / "data" / "demo"), "--per-class", "10"])
    finally:
        sys.path.remove(str(ROOT / "data"))
    shutil.copytree(tmp_path / "data" / "demo" / "train", tmp_path / "my_images")  # the quick start's folder
    monkeypatch.chdir(tmp_path)
    commands = _commands()
    assert len(commands) >= 10
    for line in commands:
        if line.startswith("embedfit finetune") or line.startswith("embedfit scratch") or \
                line.startswith("embedfit compare"):
            continue  # exercised with tiny settings in tests/test_finetune.py
        args = shlex.split(line)[1:]
        assert main(args) == 0, f"README example failed: {line}"
    for lang, body in BLOCKS:
        if lang == "python":
            exec(compile(body, "README.md", "exec"), {"__name__": "readme"})
