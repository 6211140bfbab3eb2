"""Everything that runs on a worker: model runner, reuse engine, DHD, KVSharer, worker actor."""
