"""Channels that move many KV blocks per message between workers.

Each is in its own module so that an optional dependency (ray, ucxx) is imported only by the
channel that needs it: ``from transport.channels.tcp import TCPServer, TCPClient``.
"""
