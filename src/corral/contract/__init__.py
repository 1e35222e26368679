"""The MXC wire contract: parse and validate requests of every accepted version.

``parse_request`` turns wire JSON into a validated :class:`Request`; ``request_schema``
returns the JSON Schema (draft 2020-12) of everything it accepts, Corral's ``corral``
section included.
"""

from __future__ import annotations

from corral.contract.json_schema import request_schema
from corral.contract.model import (
    SUPPORTED_VERSIONS,
    ActorSpec,
    CorralNetworkSpec,
    CorralSection,
    EgressSpec,
    FilesystemSpec,
    HostRule,
    HostRulesSpec,
    IngressSpec,
    NetworkRule,
    NetworkSpec,
    PeerSpec,
    PortSpec,
    ProcessSpec,
    ProtectedPathsSpec,
    PublishSpec,
    Request,
    ResourcesSpec,
    UiSpec,
)
from corral.contract.parse import parse_request

__all__ = [
    "SUPPORTED_VERSIONS",
    "ActorSpec",
    "CorralNetworkSpec",
    "CorralSection",
    "EgressSpec",
    "FilesystemSpec",
    "HostRule",
    "HostRulesSpec",
    "IngressSpec",
    "NetworkRule",
    "NetworkSpec",
    "PeerSpec",
    "PortSpec",
    "ProcessSpec",
    "ProtectedPathsSpec",
    "PublishSpec",
    "Request",
    "ResourcesSpec",
    "UiSpec",
    "parse_request",
    "request_schema",
]
