"""Typed errors of the transport layer.

A caller treats every ``BlockError`` the same way: drop the block, count it, recompute the KV.
The subclasses exist so that counters and logs can say *why* a block was refused.
"""
from __future__ import annotations


class BlockError(Exception):
    """A stored or received KV block cannot be used."""


class BlockFormatError(BlockError):
    """Garbage, truncated, unknown format version, or sizes that disagree with the header."""


class ChecksumError(BlockError):
    """The header or the payload does not match its xxh64 checksum."""


class FingerprintMismatch(BlockError):
    """The block was computed by another model (or another KVSharer strategy)."""


class BlockTooLarge(BlockError):
    """The block (or the size its header claims) is over the configured maximum."""


class ChannelError(Exception):
    """A channel between workers failed; the message is lost, never delivered in part."""


class ChannelClosed(ChannelError):
    """The peer closed the connection (possibly in the middle of a message)."""


class ChannelTimeout(ChannelError):
    """The peer did not answer in time."""


class ProtocolError(ChannelError):
    """The peer sent a frame that is not a valid kvcluster message."""
