"""The README's set-up commands, as a newcomer runs them (issue 29 row 16): the test command
installs Chromium as root without sudo, and with sudo otherwise."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _install_step() -> str:
    """The browser step of the README's second command: everything before its first `&& pip`."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    (test_command,) = [line for line in block.splitlines() if "pytest" in line and not line.startswith("#")]
    return test_command.split(" && pip ")[0]


def _fake(bin_dir: Path, name: str, body: str) -> None:
    (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / name).chmod(0o755)


@pytest.mark.parametrize("uid, has_sudo", [(0, False), (0, True), (1000, True)])
def test_the_test_command_installs_chromium_as_root_without_sudo(tmp_path, uid, has_sudo):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    _fake(bin_dir, "id", f"echo {uid}")
    _fake(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}')
    if has_sudo:
        _fake(bin_dir, "sudo", f'echo "sudo" >> {log}; "$@"')
    env = {**os.environ, "PATH": str(bin_dir)}  # no chromium, and sudo only where faked
    r = subprocess.run(["/bin/bash", "-c", _install_step()], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert [c for c in calls if c.startswith("apt-get")] == ["apt-get update", "apt-get install -y chromium"]
    assert calls.count("sudo") == (0 if uid == 0 else 2)
