"""Side-by-side benchmarks of shuttled against raw ssh, `ssh -L` and sshuttle.

Run as root from the repository root::

    sudo python3 -m bench [--quick] [--runs N] [--cipher default|aes128-gcm@openssh.com|both]
                          [--only shuttled,ssh-L,...] [--json out.json]

Everything happens inside one namespace lab (tests/lab): the contenders, the load and the
target services; the lab is torn down even on failure.  See bench/README.md.
"""
