#!/usr/bin/env bash
# Build helm-render (a Helm-compatible chart renderer, see main.go) and print the path of
# the binary on stdout. Installs Debian's Go toolchain and libraries if they are missing
# (needs root and apt), and caches the binary by the hash of its source, so a second
# call costs a sha256sum.
#
#   tools/helm-render/build.sh            # -> ~/.cache/coffea-hq/helm-render-<hash>
#   HELM_RENDER_CACHE=/tmp/x tools/helm-render/build.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
packages=(golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v2-dev
          golang-gopkg-yaml.v3-dev golang-github-ghodss-yaml-dev
          golang-github-xeipuuv-gojsonschema-dev)
gopath=/usr/share/gocode
cache="${HELM_RENDER_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/coffea-hq}"
# Go needs a build cache directory even where HOME is unset.
export GOCACHE="${GOCACHE:-$cache/go-build}"

hash="$(cat "$here/main.go" "$here/build.sh" | sha256sum | cut -c1-16)"
binary="$cache/helm-render-$hash"
if [[ -x "$binary" ]]; then
    echo "$binary"
    exit 0
fi

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "helm-render: missing Debian packages ${missing[*]}; install them with" \
             "apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "helm-render: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine has no package lists yet; `apt-get update` is cheap enough once.
    apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
        || { apt-get update >&2 && apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
fi

mkdir -p "$cache"
tmp="$(mktemp "$cache/.helm-render.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
# GOPATH mode: the libraries come from Debian's /usr/share/gocode, nothing is downloaded.
(cd "$here" && GO111MODULE=off GOPATH="$gopath" go build -o "$tmp" .) >&2
chmod +x "$tmp"
mv "$tmp" "$binary"
trap - EXIT
echo "$binary"
