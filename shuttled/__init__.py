"""shuttled: a VPN over ssh, in the tradition of sshuttle."""

__version__ = "0.1.0"
