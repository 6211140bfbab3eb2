"""The KV block: KV of B tokens for all stored layers, keys before RoPE, as self-checking bytes.

Wire layout (little endian)::

    prefix  16 B   magic b"KVBK" | u32 header length | u64 xxh64(header)
    header  msgpack map (version, fingerprint, dtype, shape, layers, token hash, payload xxh64)
    pad     zero bytes up to a multiple of 64, so that the tensors decode aligned
    payload keys bytes, then values bytes, each prod(shape) * itemsize

The header carries its own checksum as well as the payload's: a bit flip in the header could
otherwise relabel valid KV (another layer, another token hash) without touching the payload.
Decoding returns tensors that are *views* of the given buffer (numpy -> torch, no copy); treat them
as read-only (copy with ``.to(device)`` / ``.clone()`` before writing).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

import msgpack
import numpy as np
import torch
import xxhash

from transport.errors import BlockFormatError, BlockTooLarge, ChecksumError, FingerprintMismatch

FORMAT_VERSION = 1
MAGIC = b"KVBK"
_PREFIX = struct.Struct("<4sIQ")
ALIGN = 64
DEFAULT_BLOCK_TOKENS = 64
DEFAULT_MAX_BLOCK_BYTES = 64 << 20
MAX_HEADER_BYTES = 64 << 10  # a header is ~100 B + 2 B per layer; anything huge is garbage

# dtype name -> (torch dtype, numpy dtype used for the byte view). bfloat16 has no numpy dtype,
# so it travels as uint16 and is reinterpreted on the torch side.
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),
    "float64": (torch.float64, np.dtype("<f8")),
    "int8": (torch.int8, np.dtype("i1")),
    "uint8": (torch.uint8, np.dtype("u1")),
}
_NAME_OF = {t: name for name, (t, _) in DTYPES.items()}
_HEADER_KEYS = {"v", "fp", "dt", "shape", "layers", "th", "ck"}


@dataclass
class KVBlock:
    """KV of ``n_tokens`` tokens: ``keys``/``values`` are [n_layers, n_kv_heads, n_tokens, head_dim]."""

    fingerprint: str
    layers: tuple[int, ...]
    token_hash: int
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "KVBlock":
        return KVBlock(self.fingerprint, self.layers, self.token_hash,
                       self.keys.to(device, non_blocking=non_blocking),
                       self.values.to(device, non_blocking=non_blocking))


def token_hash(token_ids: Sequence[int] | np.ndarray) -> int:
    """xxh64 of the token ids as little-endian int32: ties a block to the tokens it was computed for."""
    return xxhash.xxh64_intdigest(np.ascontiguousarray(token_ids, dtype="<i4").tobytes())


def block_key(fingerprint: str, segment_id: str, block_index: int) -> str:
    return f"{fingerprint}:{segment_id}:{block_index}"


def _byte_view(t: torch.Tensor) -> memoryview:
    """A flat byte view of a tensor; copies only if it is on a device or not contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    return memoryview(t.numpy()).cast("B")


def _validate_block(block: KVBlock) -> str:
    k, v = block.keys, block.values
    if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"keys/values must share one 4-d shape and dtype, got {tuple(k.shape)} "
                         f"{k.dtype} and {tuple(v.shape)} {v.dtype}")
    if k.dtype not in _NAME_OF:
        raise ValueError(f"unsupported KV dtype {k.dtype}")
    if len(block.layers) != k.shape[0]:
        raise ValueError(f"{len(block.layers)} layer indices for {k.shape[0]} stored layers")
    return _NAME_OF[k.dtype]


def _pad_len(header_len: int) -> int:
    return (-(_PREFIX.size + header_len)) % ALIGN


def encode_block(block: KVBlock) -> list[memoryview]:
    """[prefix+header+pad, keys bytes, values bytes]: the tensors' own memory when on CPU and contiguous."""
    dtype_name = _validate_block(block)
    kview, vview = _byte_view(block.keys), _byte_view(block.values)
    ck = xxhash.xxh64()
    ck.update(kview)
    ck.update(vview)
    header = msgpack.packb({
        "v": FORMAT_VERSION, "fp": block.fingerprint, "dt": dtype_name,
        "shape": list(block.keys.shape), "layers": [int(x) for x in block.layers],
        "th": int(block.token_hash), "ck": ck.intdigest(),
    })
    head = _PREFIX.pack(MAGIC, len(header), xxhash.xxh64_intdigest(header)) + header
    head += bytes(_pad_len(len(header)))
    return [memoryview(head), kview, vview]


def encoded_size(parts: Sequence[memoryview]) -> int:
    return sum(p.nbytes for p in parts)


def join_parts(parts: Sequence[memoryview], out: memoryview | None = None) -> bytearray | memoryview:
    """Copy encoded parts into one buffer (``out`` if given, e.g. a pinned host buffer)."""
    total = encoded_size(parts)
    dst = bytearray(total) if out is None else out
    mv = memoryview(dst).cast("B")
    if mv.nbytes < total:
        raise ValueError(f"output buffer of {mv.nbytes} B is smaller than the block ({total} B)")
    off = 0
    for p in parts:
        mv[off:off + p.nbytes] = p
        off += p.nbytes
    return dst


def encode_block_bytes(block: KVBlock) -> bytes:
    """The block as one immutable buffer (one copy of the KV). ``bytes``, not bytearray: redis-py
    (with hiredis) and the host tier take bytes as they are and would copy anything else."""
    return b"".join(encode_block(block))


def _parse_header(raw: memoryview) -> dict:
    try:
        h = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises many types on garbage; all mean "not a header"
        raise BlockFormatError(f"header is not msgpack: {type(e).__name__}") from None
    if not isinstance(h, dict) or set(h) != _HEADER_KEYS:
        raise BlockFormatError("header has wrong fields")
    if h["v"] != FORMAT_VERSION:
        raise BlockFormatError(f"unknown block format version {h['v']!r}")
    if not isinstance(h["fp"], str) or not isinstance(h["dt"], str) or h["dt"] not in DTYPES:
        raise BlockFormatError("bad fingerprint or dtype in header")
    shape, layers = h["shape"], h["layers"]
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(type(x) is int and 0 < x < 1 << 31 for x in shape)):
        raise BlockFormatError(f"bad shape {shape!r}")
    if (not isinstance(layers, list) or len(layers) != shape[0]
            or not all(type(x) is int and 0 <= x < 1 << 16 for x in layers)
            or len(set(layers)) != len(layers)):
        raise BlockFormatError("layer indices disagree with the shape")
    if not all(type(h[k]) is int and 0 <= h[k] < 1 << 64 for k in ("th", "ck")):
        raise BlockFormatError("bad hashes in header")
    return h


def decode_block(buf, expected_fingerprint: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
                 expected_token_hash: int | None = None, verify_payload: bool = True) -> KVBlock:
    """Verify and decode one block; tensors are views of ``buf``. Raises a ``BlockError`` subclass.

    ``verify_payload=False`` checks everything but the payload's xxh64: only for a caller that
    verifies the payload another way (the host tier checks it on the GPU after the copy).
    """
    try:
        mv = memoryview(buf).cast("B")
    except TypeError as e:
        raise BlockFormatError(f"not a buffer: {e}") from None
    n = mv.nbytes
    if n > max_bytes:
        raise BlockTooLarge(f"block of {n} B is over the maximum of {max_bytes} B")
    if n < _PREFIX.size:
        raise BlockFormatError(f"truncated: {n} B")
    magic, hlen, hhash = _PREFIX.unpack_from(mv)
    if magic != MAGIC:
        raise BlockFormatError("bad magic")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > n:
        raise BlockFormatError(f"header length {hlen} does not fit in {n} B")
    raw = mv[_PREFIX.size:_PREFIX.size + hlen]
    if xxhash.xxh64_intdigest(raw) != hhash:
        raise ChecksumError("header checksum mismatch")
    h = _parse_header(raw)
    tdtype, npdtype = DTYPES[h["dt"]]
    shape = tuple(h["shape"])
    half = int(np.prod(shape, dtype=np.int64)) * npdtype.itemsize
    start = _PREFIX.size + hlen + _pad_len(hlen)
    if start + 2 * half > max_bytes:
        raise BlockTooLarge(f"header claims {start + 2 * half} B, maximum is {max_bytes} B")
    if start + 2 * half != n:
        raise BlockFormatError(f"header says {start + 2 * half} B, buffer has {n} B")
    if any(mv[_PREFIX.size + hlen:start]):
        raise BlockFormatError("non-zero padding")
    if expected_fingerprint is not None and h["fp"] != expected_fingerprint:
        raise FingerprintMismatch(f"block of model {h['fp']!r}, expected {expected_fingerprint!r}")
    if expected_token_hash is not None and h["th"] != expected_token_hash:
        raise FingerprintMismatch("block was computed for other tokens")
    payload = mv[start:]
    if verify_payload and xxhash.xxh64_intdigest(payload) != h["ck"]:
        raise ChecksumError("payload checksum mismatch")
    k = np.frombuffer(payload, dtype=npdtype, count=half // npdtype.itemsize)
    v = np.frombuffer(payload, dtype=npdtype, count=half // npdtype.itemsize, offset=half)
    keys = torch.from_numpy(k).view(tdtype).view(shape)
    values = torch.from_numpy(v).view(tdtype).view(shape)
    return KVBlock(h["fp"], tuple(h["layers"]), h["th"], keys, values)


def split_segment(keys: torch.Tensor, values: torch.Tensor, fingerprint: str,
                  layers: Sequence[int], token_ids: Sequence[int] | np.ndarray,
                  block_tokens: int = DEFAULT_BLOCK_TOKENS) -> list[KVBlock]:
    """Cut [L, n_kv, T, d] KV into blocks of ``block_tokens`` tokens (the last one may be shorter).

    Block tensors are views of the segment; tiers copy what they keep.
    """
    if block_tokens < 1:
        raise ValueError("block_tokens must be >= 1")
    ids = np.ascontiguousarray(token_ids, dtype=np.int32)
    n = keys.shape[2]
    if len(ids) != n or values.shape != keys.shape:
        raise ValueError(f"{len(ids)} token ids for KV of {n} tokens")
    layers = tuple(int(x) for x in layers)
    return [KVBlock(fingerprint, layers, token_hash(ids[s:s + block_tokens]),
                    keys[:, :, s:s + block_tokens], values[:, :, s:s + block_tokens])
            for s in range(0, n, block_tokens)]


def join_blocks(blocks: Sequence[KVBlock]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate blocks along the token axis back into segment KV [L, n_kv, T, d]."""
    if not blocks:
        raise ValueError("no blocks to join")
    first = blocks[0]
    for b in blocks[1:]:
        if b.layers != first.layers or b.fingerprint != first.fingerprint:
            raise ValueError("blocks of different models or layer sets")
    return (torch.cat([b.keys for b in blocks], dim=2),
            torch.cat([b.values for b in blocks], dim=2))
