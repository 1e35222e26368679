"""The fixed addressing of the user-mode network that connects a sandbox to the host.

slirp4netns's defaults: the sandbox is 10.0.2.100 behind a virtual gateway; 10.0.2.2 (and
fd00::2) is mapped to the host's loopback, 10.0.2.3 (and fd00::3) is a DNS forwarder. The
addresses never depend on the host's own network, so the rules can name them statically.
slirp4netns configures only IPv4; Corral gives the sandbox fd00::100/64 itself (slirp.py).
"""

from __future__ import annotations

SLIRP_CIDR = "10.0.2.0/24"
GUEST_V4 = "10.0.2.100"
GUEST_V6 = "fd00::100"  # slirp's IPv6 prefix is fd00::/64; any free host part works
PREFIX_LEN_V6 = 64
HOST_LOOPBACK_V4 = "10.0.2.2"
HOST_LOOPBACK_V6 = "fd00::2"
DNS_FORWARDER_V4 = "10.0.2.3"
DNS_FORWARDER_V6 = "fd00::3"
TAP_NAME = "tap0"
TABLE = "corral"  # one table per sandbox, in the sandbox's own network namespace
