"""cockpit/dist, committed and shipped, is exactly what cockpit/src builds with the pinned
toolchain (tools/build-cockpit: npm ci of cockpit/package-lock.json into a cache outside the
checkout, then esbuild), so it never goes stale. Needs node and npm (tools/bootstrap installs
them and fills the cache) and, for a lock not yet cached, the npm registry."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from rigs import unavailable

REPO = Path(__file__).resolve().parent.parent.parent
DIST = REPO / "cockpit" / "dist"


def contents(d: Path) -> dict[str, bytes]:
    """Each file, a .gz one as its uncompressed bytes (the test compares what the browser
    gets: gzip's own bytes may differ between zlib versions)."""
    return {
        f.name: gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        for f in sorted(d.iterdir())
    }


@pytest.mark.timeout(600)
def test_the_committed_page_is_what_its_source_builds(tmp_path: Path) -> None:
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} not installed (apt-get install nodejs npm)")
    out = tmp_path / "dist"
    r = subprocess.run(
        [str(REPO / "tools" / "build-cockpit"), "--outdir", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    built, committed = contents(out), contents(DIST)
    assert built.keys() == committed.keys()
    stale = [name for name in built if built[name] != committed[name]]
    assert stale == [], f"cockpit/dist is stale ({stale}): run tools/build-cockpit and commit"


def test_the_page_is_pinned_and_carries_the_version() -> None:
    package = json.loads((REPO / "cockpit" / "package.json").read_text())
    lock = json.loads((REPO / "cockpit" / "package-lock.json").read_text())
    for name, version in package["dependencies"].items():
        assert version[0].isdigit(), f"{name}: {version} is not an exact version"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version, name
    version = next(
        ln.split('"')[1]
        for ln in (REPO / "pyproject.toml").read_text().splitlines()
        if ln.startswith("version = ")
    )
    for manifest in (REPO / "cockpit" / "src" / "manifest.json", DIST / "manifest.json"):
        assert json.loads(manifest.read_text())["version"] == version, manifest
