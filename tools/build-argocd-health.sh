#!/usr/bin/env bash
# Builds tools/argocd-health (Argo CD's Lua runtime for health checks: gopher-lua at the version
# argo-cd pins) into a per-user cache keyed by its go.mod, go.sum and source, like
# tools/build-controlplane.sh does for the control plane.
#
# Prints the binary's path on stdout (the last line). Rebuilds only when the key changes.
# Environment:
#   TIO_ARGOCD_HEALTH_CACHE  cache root (default ~/.cache/truenas-incus-operator/argocd-health)
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/argocd-health" && pwd)
LUA_VERSION=$(awk '$1=="github.com/yuin/gopher-lua" {print $2}' "$src/go.mod" | head -1)
sum=$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-12)
root=${TIO_ARGOCD_HEALTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/truenas-incus-operator/argocd-health}
out="$root/gopher-lua-${LUA_VERSION}_${sum}"

if [ -x "$out/argocd-health" ]; then
  echo "$out/argocd-health"
  exit 0
fi

command -v go >/dev/null || { echo "build-argocd-health: 'go' (>= 1.26) is required on PATH" >&2; exit 1; }
echo "build-argocd-health: building the Argo CD health-check harness (gopher-lua $LUA_VERSION)" >&2
start=$(date +%s)
tmp="$out.partial.$$"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
(cd "$src" && CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" -o "$tmp/argocd-health" .)
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "build-argocd-health: built in $(( $(date +%s) - start ))s into $out" >&2
echo "$out/argocd-health"
