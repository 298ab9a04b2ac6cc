"""Run apmatrixctl in-process (fast) or as the installed console script (as a user would)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apmatrixd.ctl.main import main

CTL = Path(sys.executable).parent / "apmatrixctl"


@dataclass
class Run:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


def ctl(address: str, *args: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--address", address, *args])
    r = Run(rc, out.getvalue(), err.getvalue())
    assert "Traceback" not in r.out + r.err, r
    return r


def ok(address: str, *args: str) -> Run:
    r = ctl(address, *args)
    assert r.rc == 0, r
    return r


def ctl_exe(*args: str, env: dict[str, str] | None = None) -> Run:
    p = subprocess.run([str(CTL), *args], capture_output=True, text=True, timeout=60, env=env)
    r = Run(p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in r.out + r.err, r
    return r
