"""docs/configuration.md tells the truth about loading: every example in its loading section
runs — the Python blocks as written, the console blocks as shell commands whose output must
match the page line for line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
SECTION = GUIDE.read_text().split("## Every variable", 1)[0]
SHOWN_CWD = "/srv/app"  # the working directory the page's output shows


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", SECTION, re.S)


def test_the_loading_section_has_examples_of_each_kind() -> None:
    consoles = blocks("console")
    assert len(consoles) >= 5 and len(blocks("python")) >= 2
    shown = "\n".join(consoles)
    for source in ("(environment variable)", "(in /srv/app/.env)", "(command-line flag)"):
        assert source in shown
    assert "did you mean" in shown


def test_python_examples_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("TETHER_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    before = dict(os.environ)
    namespace: dict[str, Any] = {}
    try:
        for index, code in enumerate(blocks("python")):
            exec(compile(code, f"configuration.md-python-{index}", "exec"), namespace)
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]


@pytest.mark.parametrize("block", blocks("console"), ids=lambda b: b.splitlines()[0][:60])
def test_console_examples_print_what_the_page_shows(block: str, tmp_path: Path) -> None:
    lines = block.rstrip("\n").splitlines()
    commands = [line[2:] for line in lines if line.startswith("$ ")]
    expected = [line for line in lines if not line.startswith("$ ")]
    assert commands and expected
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TETHER_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    *setup, last = commands
    for command in setup:
        subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, check=True, timeout=30)
    done = subprocess.run(
        ["bash", "-c", last],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "listening" not in done.stdout  # refused before it ever listened
    output = (done.stdout + done.stderr).replace(str(tmp_path), SHOWN_CWD)
    assert output.rstrip("\n").splitlines() == expected
