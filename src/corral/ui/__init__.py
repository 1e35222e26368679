"""The `ui` policy on Linux: a private display per sandbox and a clipboard broker that copies
between it and the human's display in the allowed direction only."""

from corral.ui.broker import BrokerConfig, ClipboardBroker, HumanDisplay
from corral.ui.display import DisplayAddress, PrivateDisplay, start_private_display

__all__ = [
    "BrokerConfig",
    "ClipboardBroker",
    "DisplayAddress",
    "HumanDisplay",
    "PrivateDisplay",
    "start_private_display",
]
