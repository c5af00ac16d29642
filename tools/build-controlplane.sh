#!/usr/bin/env bash
# Builds kube-apiserver, kubectl, etcd (tools/controlplane) and helm (tools/helm) from the
# upstream Go modules pinned in those go.mod files, into a per-user cache keyed by version.
# Release binaries cannot be downloaded on our machines; the Go module proxy can be reached.
#
# Prints the binary folder on stdout (the last line). Rebuilds only when the key changes.
# Environment:
#   TIO_CONTROLPLANE_CACHE  cache root (default ~/.cache/truenas-incus-operator/controlplane)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=$(awk '$1=="k8s.io/kubernetes" {print $2} $2=="k8s.io/kubernetes" {print $3}' "$here/controlplane/go.mod" | head -1)
ETCD_VERSION=$(awk '$1=="go.etcd.io/etcd/server/v3" {print $2}' "$here/controlplane/go.mod" | head -1)
HELM_VERSION=$(awk '$1=="helm.sh/helm/v3" {print $2}' "$here/helm/go.mod" | head -1)
# Helm's own build sets the Kubernetes version it assumes without a cluster (`helm template`,
# `helm lint`) from its client-go module: without these link flags it assumes v1.20 and refuses a
# chart's kubeVersion. HELM_BUILD names the flags in the cache key, so a changed build is rebuilt.
CLIENT_GO=$(awk '$1=="k8s.io/client-go" {print $2}' "$here/helm/go.mod" | head -1)
HELM_K8S_MAJOR=$(( $(echo "${CLIENT_GO#v}" | cut -d. -f1) + 1 ))
HELM_K8S_MINOR=$(echo "$CLIENT_GO" | cut -d. -f2)
HELM_BUILD="kv${HELM_K8S_MAJOR}.${HELM_K8S_MINOR}"
sum=$(cat "$here/controlplane/go.sum" "$here/helm/go.sum" | sha256sum | cut -c1-12)
old_key="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}_${sum}"
key="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}-${HELM_BUILD}_${sum}"
root=${TIO_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/truenas-incus-operator/controlplane}
out="$root/$key"

if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ] && [ -x "$out/kubectl" ] && [ -x "$out/helm" ]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { echo "build-controlplane: 'go' (>= 1.26) is required on PATH" >&2; exit 1; }
start=$(date +%s)
tmp="$out.partial.$$"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT

helm_ldf="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_ldf="$helm_ldf -X $p.k8sVersionMajor=$HELM_K8S_MAJOR -X $p.k8sVersionMinor=$HELM_K8S_MINOR"
done
build_helm() {
  (
    cd "$here/helm"
    CGO_ENABLED=0 go build -trimpath -ldflags "$helm_ldf" -o "$1/helm" helm.sh/helm/v3/cmd/helm
    echo "build-controlplane: helm done ($(( $(date +%s) - start ))s)" >&2
  )
}

# The same control plane under the key before HELM_BUILD: reuse it and build only helm.
old="$root/$old_key"
if [ -x "$old/kube-apiserver" ] && [ -x "$old/etcd" ] && [ -x "$old/kubectl" ]; then
  echo "build-controlplane: reusing kube-apiserver, etcd, kubectl from $old; building helm ($HELM_VERSION, $HELM_BUILD)" >&2
  for b in kube-apiserver etcd kubectl; do cp -p "$old/$b" "$tmp/$b"; done
  build_helm "$tmp"
  rm -rf "$out"
  mv "$tmp" "$out"
  trap - EXIT
  echo "build-controlplane: built in $(( $(date +%s) - start ))s into $out" >&2
  echo "$out"
  exit 0
fi

echo "build-controlplane: building kube-apiserver, kubectl ($K8S_VERSION), etcd ($ETCD_VERSION), helm ($HELM_VERSION)" >&2
echo "build-controlplane: the first build takes a while (minutes on 2 cores); later runs reuse $out" >&2
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
ldf="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldf="$ldf -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
export CGO_ENABLED=0
(
  cd "$here/controlplane"
  go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ldf" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  echo "build-controlplane: kube-apiserver done ($(( $(date +%s) - start ))s)" >&2
  go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ldf" -o "$tmp/kubectl" k8s.io/kubernetes/cmd/kubectl
  echo "build-controlplane: kubectl done ($(( $(date +%s) - start ))s)" >&2
  go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
  echo "build-controlplane: etcd done ($(( $(date +%s) - start ))s)" >&2
)
build_helm "$tmp"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "build-controlplane: built in $(( $(date +%s) - start ))s into $out" >&2
echo "$out"
