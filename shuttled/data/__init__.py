"""Copies of the files a package installs besides the code, for `shuttled install-service`.

The sources are systemd/ and packaging/ (the .deb and the RPM install those);
tests/unit/test_install_service.py keeps these copies equal to them. Refresh with:
python3 -m shuttled.install --sync-data
"""

# Copy here: its source in the tree.
SOURCES = {
    "shuttled.service": "systemd/shuttled.service",
    "shuttled-lockdown.service": "systemd/shuttled-lockdown.service",
    "io.github.shuttled.conf": "systemd/io.github.shuttled.conf",
    "shuttled.sysusers.conf": "packaging/sysusers.d/shuttled.conf",
    "example.yaml": "packaging/example.yaml",
}
