"""Redis stopped mid-run: reads miss, writes are dropped and counted, nothing raises, and the
tier recovers by itself once a server listens on the port again."""
import time

import torch

from tests.transport.conftest import make_block, same_block
from transport.tiers import GPUTier, HostTier, TieredStore
from transport.tiers.redis_tier import RedisTier


def _wait_until(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_redis_down_and_back(spare_redis):
    spare_redis.start()
    tier = RedisTier(f"redis://127.0.0.1:{spare_redis.port}/0", prefix="kvc-test-outage:",
                     ttl_s=60, socket_timeout_s=0.5, connect_timeout_s=0.2,
                     backoff_initial_s=0.05, backoff_max_s=0.4)
    blk = make_block(torch.float16)
    tier.put_many([("a", blk)])
    assert same_block(tier.get_many(["a"])[0], blk)

    spare_redis.stop()
    t0 = time.monotonic()
    for i in range(20):  # no exception reaches the caller
        assert tier.get_many(["a", "b"]) == [None, None]
        tier.put_many([(f"w{i}", blk)])
        assert not tier.contains("a")
        assert not tier.evict("a")
    assert time.monotonic() - t0 < 5  # backoff: a dead server is not retried on every call
    assert not tier.is_up
    assert tier.stats.dropped_writes == 20 and tier.stats.errors >= 1
    assert tier.stats.misses >= 40

    spare_redis.start()  # same port, empty (no persistence)
    assert _wait_until(lambda: (tier.put_many([("c", blk)]), tier.contains("c"))[1])
    assert tier.is_up
    assert same_block(tier.get_many(["c"])[0], blk)
    tier.close()


def test_tiered_store_survives_redis_outage(spare_redis):
    spare_redis.start()
    redis = RedisTier(f"redis://127.0.0.1:{spare_redis.port}/0", prefix="kvc-test-outage2:",
                      socket_timeout_s=0.5, connect_timeout_s=0.2, backoff_max_s=0.4)
    store = TieredStore(GPUTier(1 << 20), HostTier(1 << 20), redis)
    spare_redis.stop()
    blocks = [(f"k{i}", make_block(seed=i)) for i in range(5)]
    store.put_many(blocks)
    assert store.flush(10)
    assert store.get_many(["k0", "zz"])[1] is None  # GPU still serves k0; zz is a plain miss
    assert store.get_many(["k0"])[0] is not None
    assert redis.stats.dropped_writes == 5
    spare_redis.start()
    later = [("later", make_block(seed=9))]
    # writes issued while the tier still backs off are dropped: keep writing until one lands
    assert _wait_until(lambda: (store.put_many(later), store.flush(5), redis.contains("later"))[2])
    store.close()
