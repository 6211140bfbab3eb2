"""Property tests: damaged blocks and messages are always refused with a typed error, never
decoded into (wrong) KV. 4 x 2,500 + 2 x 1,000 = 12,000 cases."""
import msgpack
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.transport.conftest import make_block
from transport.block import MAGIC, decode_block, encode_block_bytes
from transport.errors import BlockError, ProtocolError
from transport.message import PREFIX, pack_message, parse_header, parse_prefix

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)
BLOCKS = [bytes(encode_block_bytes(make_block(dt, layers=(0, 3), heads=2, tokens=t, head_dim=8,
                                              seed=t)))
          for dt in (torch.float32, torch.float16, torch.bfloat16) for t in (1, 7, 64)]


def _refused(buf) -> None:
    with pytest.raises(BlockError):
        decode_block(buf)


@settings(max_examples=2500, **SETTINGS)
@given(st.sampled_from(BLOCKS), st.lists(st.integers(0, 1 << 30), min_size=1, max_size=8))
def test_bit_flips_detected(buf, positions):
    damaged = bytearray(buf)
    flipped = set()
    for p in positions:
        bit = p % (len(buf) * 8)
        flipped ^= {bit}
        damaged[bit // 8] ^= 1 << (bit % 8)
    if not flipped:  # flips cancelled out: the block is intact and must decode
        decode_block(damaged)
        return
    _refused(damaged)


@settings(max_examples=2500, **SETTINGS)
@given(st.sampled_from(BLOCKS), st.data())
def test_truncation_and_extension_detected(buf, data):
    cut = data.draw(st.integers(0, len(buf) - 1))
    _refused(buf[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=128))
    _refused(buf + extra)


@settings(max_examples=2500, **SETTINGS)
@given(st.binary(max_size=512), st.booleans())
def test_garbage_detected(garbage, with_magic):
    _refused((MAGIC + garbage) if with_magic else garbage)


_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=8)
                       | st.binary(max_size=8) | st.floats(allow_nan=False),
                       lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=6), c, max_size=5),
                       max_leaves=12)
_fields = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just(1), _values), "fp": st.one_of(st.just("fp-test"), _values),
    "dt": st.one_of(st.sampled_from(["float32", "bfloat16", "complex64"]), _values),
    "shape": st.one_of(st.lists(st.integers(-3, 1 << 40), max_size=5), _values),
    "layers": st.one_of(st.lists(st.integers(-1, 1 << 17), max_size=4), _values),
    "th": _values, "ck": _values, "extra": _values})


@settings(max_examples=2500, **SETTINGS)
@given(_fields, st.binary(max_size=4096))
def test_garbage_headers_with_valid_checksum(header, payload):
    """A header that passes its checksum but says nonsense is refused, whatever follows."""
    raw = msgpack.packb(header)
    head = PREFIX.pack(MAGIC, len(raw), xxhash.xxh64_intdigest(raw), 0)[:16] + raw
    buf = head + bytes((-len(head)) % 64) + payload
    _refused(buf)


@settings(max_examples=1000, **SETTINGS)
@given(st.lists(st.sampled_from(BLOCKS + [None]), min_size=1, max_size=4), st.integers(0, 1 << 30))
def test_message_header_bit_flips_detected(blocks, pos):
    keys = [f"k{i}" for i in range(len(blocks))]
    head = bytearray(pack_message("blocks", keys, blocks)[0])
    bit = pos % (len(head) * 8)
    head[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProtocolError):
        hlen, hhash, body = parse_prefix(head[:PREFIX.size])
        if len(head) != PREFIX.size + hlen:
            raise ProtocolError("length")
        parse_header(head[PREFIX.size:], hhash, body)


@settings(max_examples=1000, **SETTINGS)
@given(st.binary(min_size=PREFIX.size, max_size=256))
def test_message_garbage_detected(garbage):
    with pytest.raises(ProtocolError):
        hlen, hhash, body = parse_prefix(garbage[:PREFIX.size])
        parse_header(garbage[PREFIX.size:], hhash, body)
