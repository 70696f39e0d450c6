"""Shared constants and helpers of the deployment tests (see conftest.py for fixtures)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "outbox-relay"
CI_VALUES = CHART / "ci"
DOCKERFILE = REPO / "Dockerfile"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
INSTALL_HINT = "run `scripts/install-tools.sh` (installs helm, hadolint, kubernetes-validate)"

# Kubernetes versions the rendered manifests are validated against (offline schemas shipped by
# kubernetes-validate): the chart's minimum kubeVersion and the version helm v3.21 targets.
KUBERNETES_VERSIONS = ("1.25.0", "1.36.0")


def tools_bin() -> Path:
    root = os.environ.get("OUTBOX_TOOLS_DIR") or str(Path.home() / ".cache" / "outbox-relay")
    return Path(root) / "bin"


def find_tool(name: str) -> str | None:
    """``name`` from the tools cache, the project venv, this interpreter's venv, or PATH."""
    for directory in (tools_bin(), REPO / ".venv" / "bin", Path(sys.executable).parent):
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.fail(
            f"{name} not found in {tools_bin()}, {REPO / '.venv/bin'} or PATH: {INSTALL_HINT}"
        )
    return path


def run(
    cmd: Sequence[str], *, timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
