"""The control API of the daemon: one protocol module, one verb table, the transports.

Kept empty on purpose: `shuttlectl` imports `shuttled.control.protocol`, and
importing this package must not drag the daemon's modules in with it.
"""
