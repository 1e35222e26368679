"""Per-sandbox network enforcement: nftables rules inside the sandbox's network namespace,
user-mode networking (slirp4netns) to the host, the enforced proxy of
``runtimeConfig.networkProxy`` and Corral's policy proxy for hostname and HTTP rules.

The backend calls :func:`probe` to learn what the host offers, then :func:`attach` from
the parent once the sandbox's first child has its own network namespace and before the
workload starts; the returned :class:`NetworkAttachment` owns everything it set up.
"""

from corral.net.attachment import NetworkAttachment, attach, attach_detached, replace_rules_in
from corral.net.probe import probe

__all__ = ["NetworkAttachment", "attach", "attach_detached", "probe", "replace_rules_in"]
