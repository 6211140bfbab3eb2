"""KV blocks, storage tiers (GPU, host memory, Redis) and channels between workers."""
