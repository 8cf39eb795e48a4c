"""shuttlectl: the command-line client of the shuttled daemon (a thin client over
the control socket; it shares only shuttled.control.protocol, const and errors)."""
