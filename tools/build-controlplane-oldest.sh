#!/usr/bin/env bash
# Builds the OLDEST Kubernetes the project supports (README "Kubernetes versions"): kube-apiserver
# and etcd from the Go modules pinned in tools/controlplane-oldest/go.mod, into the same per-user
# cache as build-controlplane.sh, keyed by version. kubectl and helm are today's (build-controlplane.sh):
# kubectl 1.37 talks to a 1.31 API server (it prints a version-skew warning only), and the Go module
# proxy lacks some 1.31 staging modules kubectl would need.
#
# Prints the binary folder on stdout (the last line); point TIO_CONTROLPLANE_BIN at it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mod="$here/controlplane-oldest"
K8S_VERSION=$(awk '$1=="k8s.io/kubernetes" {print $2} $2=="k8s.io/kubernetes" {print $3}' "$mod/go.mod" | head -1)
ETCD_VERSION=$(awk '$1=="go.etcd.io/etcd/server/v3" {print $2}' "$mod/go.mod" | head -1)
current=$(bash "$here/build-controlplane.sh" | tail -1)  # kubectl and helm
sum=$( (cat "$mod/go.sum"; echo "$current") | sha256sum | cut -c1-12)
root=${TIO_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/truenas-incus-operator/controlplane}
out="$root/oldest-k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_${sum}"

if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ] && [ -x "$out/kubectl" ] && [ -x "$out/helm" ]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { echo "build-controlplane-oldest: 'go' (>= 1.26) is required on PATH" >&2; exit 1; }
start=$(date +%s)
tmp="$out.partial.$$"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "build-controlplane-oldest: building kube-apiserver ($K8S_VERSION), etcd ($ETCD_VERSION): ~3 minutes on 2 cores" >&2
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
ldf="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldf="$ldf -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
export CGO_ENABLED=0
(
  cd "$mod"
  go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ldf" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
)
cp -p "$current/kubectl" "$current/helm" "$tmp/"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "build-controlplane-oldest: built in $(( $(date +%s) - start ))s into $out" >&2
echo "$out"
