"""Small helpers several test folders share: a free loopback port and a stand-in for Serve's gRPC context."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port free right now (the OS picks it), for servers the tests start."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FakeContext:
    """Records what RayServegRPCContext would carry back to the proxy: the status code, details and metadata."""

    def __init__(self, metadata=()):
        self.code = None
        self.details = None
        self.metadata = list(metadata)

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def invocation_metadata(self):
        return self.metadata
