"""Every command the README's walkthrough shows runs as shown.

The blocks that follow a `<!-- run -->` marker in README.md are executed in order, line by line, in one fresh
working folder (so later commands see the files earlier ones wrote), each needing exit code 0.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- run -->\s*```(?:bash|console)\n(.*?)```", re.S)


def walkthrough_commands() -> list[str]:
    commands = []
    for block in BLOCK.findall((REPO / "README.md").read_text()):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_the_walkthrough_has_commands():
    commands = walkthrough_commands()
    assert len(commands) >= 6
    assert all(shlex.split(c)[0] == "golfquant" for c in commands)


@pytest.mark.slow
def test_every_walkthrough_command_runs(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GOLFQUANT_THREADS": "1"}
    for command in walkthrough_commands():
        res = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, f"{command}\n{res.stderr[-2000:]}"
