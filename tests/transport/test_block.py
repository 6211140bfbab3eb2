import msgpack
import numpy as np
import pytest
import torch
import xxhash

from tests.transport.conftest import make_block, same_block
from transport.block import (MAGIC, KVBlock, block_key, decode_block, encode_block,
                             encode_block_bytes, join_blocks, split_segment, token_hash)
from transport.errors import (BlockError, BlockFormatError, BlockTooLarge, ChecksumError,
                              FingerprintMismatch)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,head_dim,layers", [
    (1, 1, 8, (0,)), (64, 3, 64, (0, 1, 2, 5)), (17, 8, 128, tuple(range(0, 30, 3)))])
def test_round_trip(dtype, tokens, heads, head_dim, layers):
    blk = make_block(dtype, layers, heads, tokens, head_dim)
    buf = bytes(encode_block_bytes(blk))
    out = decode_block(buf, expected_fingerprint="fp-test")
    assert same_block(out, blk)
    assert out.keys.shape == (len(layers), heads, tokens, head_dim)


def test_decode_is_zero_copy_view():
    blk = make_block()
    buf = encode_block_bytes(blk)
    out = decode_block(buf)
    # the decoded tensors point into the buffer itself
    base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    assert base <= out.keys.data_ptr() < base + len(buf)
    assert (out.keys.data_ptr() - base) % 64 == 0  # payload aligned within the buffer


def test_encode_parts_reference_tensor_memory():
    blk = make_block()
    parts = encode_block(blk)
    assert np.frombuffer(parts[1], dtype=np.uint8).ctypes.data == blk.keys.data_ptr()


def test_noncontiguous_and_payload_size():
    k = torch.randn(2, 4, 128, 8)[:, :, 10:74]
    blk = KVBlock("fp", (0, 1), 1, k, k * 2)
    out = decode_block(encode_block_bytes(blk))
    assert torch.equal(out.keys, k) and torch.equal(out.values, k * 2)


def _rebuild(buf: bytes, **changes) -> bytes:
    """Re-encode a block's header with fields changed, with valid checksums."""
    hlen = int.from_bytes(buf[4:8], "little")
    h = msgpack.unpackb(buf[16:16 + hlen])
    h.update(changes)
    start = 16 + hlen + (-(16 + hlen)) % 64
    payload = buf[start:]
    new = msgpack.packb(h)
    head = MAGIC + len(new).to_bytes(4, "little") + xxhash.xxh64_intdigest(new).to_bytes(8, "little") + new
    return head + bytes((-len(head)) % 64) + payload


def test_unknown_version():
    buf = bytes(encode_block_bytes(make_block()))
    with pytest.raises(BlockFormatError, match="version"):
        decode_block(_rebuild(buf, v=99))


def test_fingerprint_mismatch():
    buf = encode_block_bytes(make_block())
    with pytest.raises(FingerprintMismatch):
        decode_block(buf, expected_fingerprint="other-model")
    with pytest.raises(FingerprintMismatch):
        decode_block(buf, expected_token_hash=12345)


def test_sizes_disagree_with_header():
    buf = bytes(encode_block_bytes(make_block(tokens=64)))
    with pytest.raises(BlockFormatError):
        decode_block(_rebuild(buf, shape=[2, 2, 32, 16]))
    with pytest.raises(BlockFormatError):
        decode_block(_rebuild(buf, layers=[0]))
    with pytest.raises(BlockFormatError):
        decode_block(buf + b"\0" * 64)


def test_too_large():
    buf = encode_block_bytes(make_block(tokens=64))
    with pytest.raises(BlockTooLarge):
        decode_block(buf, max_bytes=len(buf) - 1)
    with pytest.raises(BlockTooLarge):  # the header claims more than the maximum
        decode_block(_rebuild(bytes(buf), shape=[2, 2, 1 << 20, 16]), max_bytes=1 << 20)


def test_checksum_errors():
    buf = bytearray(encode_block_bytes(make_block()))
    buf[-1] ^= 1
    with pytest.raises(ChecksumError):
        decode_block(buf)
    buf[-1] ^= 1
    buf[20] ^= 0x10
    with pytest.raises(ChecksumError):
        decode_block(buf)


@pytest.mark.parametrize("garbage", [b"", b"KVBK", b"x" * 100, b"KVBK" + b"\xff" * 60])
def test_garbage(garbage):
    with pytest.raises(BlockFormatError):
        decode_block(garbage)


def test_error_hierarchy():
    for cls in (BlockFormatError, ChecksumError, FingerprintMismatch, BlockTooLarge):
        assert issubclass(cls, BlockError)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_and_join(dtype):
    k = torch.randn(3, 2, 200, 8).to(dtype)
    v = torch.randn(3, 2, 200, 8).to(dtype)
    ids = np.arange(200)
    blocks = split_segment(k, v, "fp", (0, 4, 7), ids, block_tokens=64)
    assert [b.n_tokens for b in blocks] == [64, 64, 64, 8]
    assert blocks[1].token_hash == token_hash(ids[64:128])
    decoded = [decode_block(encode_block_bytes(b)) for b in blocks]
    k2, v2 = join_blocks(decoded)
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_block_key_and_token_hash():
    assert block_key("fp", "seg", 3) == "fp:seg:3"
    assert token_hash([1, 2, 3]) == token_hash(np.array([1, 2, 3], dtype=np.int64))
    assert token_hash([1, 2, 3]) != token_hash([1, 2, 4])


def test_bad_block_rejected_at_encode():
    with pytest.raises(ValueError):
        encode_block(KVBlock("fp", (0,), 0, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)))
