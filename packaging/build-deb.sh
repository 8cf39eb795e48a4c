#!/usr/bin/env bash
# Build the Debian package from this tree: packaging/debian becomes debian/ of a scratch
# copy of the source (the repository's layout keeps debian/ out of the top level).
#
#   packaging/build-deb.sh [OUTDIR]      default OUTDIR: dist/deb
#
# Needs: dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
# python3-setuptools python3-wheel (and lintian to check the result). Prints the .deb's path last.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$here/dist/deb}" && cd "${1:-$here/dist/deb}" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The source as git would export it (no build products, caches or local venvs).
mkdir "$tmp/src"
tar -C "$here" --exclude-vcs --exclude='./dist' --exclude='./build' --exclude='*.egg-info' \
    --exclude='__pycache__' --exclude='.*_cache' --exclude='./.hypothesis' --exclude='./.venv' \
    --exclude='./bench/results' \
    -cf - . | tar -C "$tmp/src" -xf -
cp -r "$here/packaging/debian" "$tmp/src/debian"

# Debian's own python3 and tools only: a pyenv or venv python first in PATH is not the
# interpreter the package is for.
(cd "$tmp/src" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b) >"$tmp/build.log" 2>&1 || {
    tail -n 60 "$tmp/build.log" >&2
    exit 1
}
for f in "$tmp"/*.deb "$tmp"/*.buildinfo "$tmp"/*.changes; do
    cp "$f" "$out/"
done
ls "$out"/shuttled_*_all.deb
