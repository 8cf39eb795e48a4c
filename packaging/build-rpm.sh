#!/usr/bin/env bash
# Build the RPM from an sdist of this tree with rpmbuild.
#
#   packaging/build-rpm.sh [OUTDIR]      default OUTDIR: dist/rpm
#
# On Fedora/EL install the BuildRequires of packaging/rpm/shuttled.spec first. Elsewhere
# (CI: Debian's rpm package) the build dependencies cannot be checked against an RPM
# database, so this runs rpmbuild --nodeps and the spec's fallbacks stand in for the
# pyproject/systemd macros. Needs python3 with build (for the sdist) and /usr/bin/python3
# with pip, setuptools and wheel (the wheel inside the RPM). Prints the
# .rpm's path last.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$here/dist/rpm}" && cd "${1:-$here/dist/rpm}" && pwd)
py=${PYTHON:-python3}
top=$(mktemp -d)
trap 'rm -rf "$top"' EXIT
mkdir -p "$top"/{BUILD,RPMS,SOURCES,SPECS,SRPMS}

"$py" -m build --sdist --outdir "$top/SOURCES" "$here" >"$top/sdist.log" 2>&1 || {
    tail -n 40 "$top/sdist.log" >&2
    exit 1
}
nodeps=()
rpm -q rpm >/dev/null 2>&1 || nodeps=(--nodeps)   # no RPM database: not an RPM distro
# The interpreter the RPM is for: the system's python3 (with setuptools and wheel), not a
# pyenv or venv one that happens to be first in PATH.
rpm_py=${RPM_PYTHON:-/usr/bin/python3}
rpmbuild -bb "${nodeps[@]}" --define "_topdir $top" --define "__python3 $rpm_py" \
    "$here/packaging/rpm/shuttled.spec" >"$top/rpmbuild.log" 2>&1 || {
    tail -n 60 "$top/rpmbuild.log" >&2
    exit 1
}
cp "$top"/RPMS/noarch/shuttled-*.noarch.rpm "$out/"
ls "$out"/shuttled-*.noarch.rpm
