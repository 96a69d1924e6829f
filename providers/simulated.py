"""Simulated provider (placeholder until the full driver lands): accepts every call."""

from __future__ import annotations

from providers.base import Capabilities, ProviderConfig, ServerInfo


class SimulatedDriver:
    def __init__(self, config: ProviderConfig):
        self.config = config

    def server_info(self) -> ServerInfo:
        return ServerInfo(version="simulated-0")

    def capabilities(self) -> Capabilities:
        return Capabilities(instance_types=("container", "vm"))
