"""Plot benchmarks/results/kvsharer_gpu.json: decode tokens/s at each KV budget's largest batch,
without and with layer sharing, beside the bandwidth model's speedup."""
import json
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/kvsharer_gpu.json")
data = json.loads(src.read_text())
rows = data["summary"]["by_budget"]
labels = [f"{r['budget_gib']:g} GiB\n{r['batch_no_sharing']} → {r['batch_sharing']}" for r in rows]
x = range(len(rows))
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
a.bar([i - 0.2 for i in x], [r["tokens_per_s_no_sharing"] for r in rows], 0.4, label="no sharing")
a.bar([i + 0.2 for i in x], [r["tokens_per_s_sharing"] for r in rows], 0.4, label="25% of layers share KV")
a.set_xticks(list(x), labels)
a.set_ylabel("decode tokens/s at the largest batch")
a.legend()
b.plot(list(x), [r["speedup_at_max_batches"] for r in rows], "o-", label="measured")
b.plot(list(x), [r["bandwidth_model_speedup_at_max_batches"] for r in rows], "s--", label="bandwidth model")
b.axhline(1.2, color="k", lw=1, ls=":", label="goal 1.2x")
b.set_xticks(list(x), labels)
b.set_ylabel("decode speedup with sharing")
b.legend()
fig.suptitle(f"KVSharer, Llama-3-8B shape, {data['machine'].get('device', '') if isinstance(data.get('machine'), dict) else ''} "
             f"(KV -25%, batch +33%)")
fig.tight_layout()
out = src.with_suffix(".png")
fig.savefig(out, dpi=110)
print(out)
