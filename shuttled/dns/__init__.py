"""Everything DNS: what the firewall's DNS capture hands to us, answered through the tunnel.

Reading order, from the bytes up:

- wire.py       DNS messages as bytes (RFC 1035): parse, build errors, truncate, TCP framing
- resolvconf.py resolv.conf and nameserver addresses
- datagram.py   DNS over UDP sent from the remote by the helper (udp@shuttled channels)
- upstream.py   the remote's nameservers: DNS over TCP through a direct-tcpip channel,
                pipelined (RFC 7766), else over UDP (datagram.py); failover between them
- local.py      the machine's own resolvers, for names split DNS keeps local
- cache.py      a TTL cache of replies
- routing.py    split DNS: which names go through which profile; the remote's /etc/hosts
- forwarder.py  DnsForwarder: every query answered (reply or SERVFAIL), routed, cached
- listeners.py  the UDP and TCP listeners the firewall redirects queries to
- lan.py        router mode: DNS from LAN clients, by TPROXY
- resolved.py   systemd-resolved: per-link DNS for split mode, without any firewall rule
- resolver.py   one profile's DNS put together from the pieces above (the supervisor's seam)

Imports: this package uses the tunnel's data plane (channels, proxy listeners) and
shuttled.net; nothing below it imports DNS.
"""
