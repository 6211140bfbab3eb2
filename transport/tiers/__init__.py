"""Storage tiers behind one interface: GPU (per worker), host memory (per node), Redis (shared)."""
from transport.tiers.base import Tier, TierStats
from transport.tiers.gpu import GPUTier
from transport.tiers.host import HostTier
from transport.tiers.redis_tier import RedisTier
from transport.tiers.tiered import TieredStore

__all__ = ["Tier", "TierStats", "GPUTier", "HostTier", "RedisTier", "TieredStore"]
