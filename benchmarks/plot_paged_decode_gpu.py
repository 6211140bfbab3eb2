"""Plot benchmarks/results/paged_decode_gpu.json: ms per batched decode step per path, against the
weights + KV read limit, per batch size and sequence length."""
import json
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/paged_decode_gpu.json")
data = json.loads(src.read_text())
rows = data["results"]
paths = [k for k in rows[0] if k not in ("batch", "tokens", "limit_ms")]
lengths = sorted({r["tokens"] for r in rows})
fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), sharey=True)
for ax, n in zip(axes if len(lengths) > 1 else [axes], lengths):
    sub = [r for r in rows if r["tokens"] == n]
    xs = [r["batch"] for r in sub]
    for i, p in enumerate(paths):
        ax.plot(xs, [r[p] for r in sub], marker="o", label=p, color=f"C{i}")
    ax.plot(xs, [r["limit_ms"] for r in sub], "k--", lw=1, label="weights + KV read once")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("sequences in the batch")
    ax.set_title(f"{n:,} tokens each")
axes[0].set_ylabel("ms per decode step")
axes[0].legend(fontsize=8)
fig.suptitle(f"Batched paged decode step, Llama-3-8B shape, {data['device']}, {data['date'][:10]}")
fig.tight_layout()
out = src.with_suffix(".png")
fig.savefig(out, dpi=110)
print(out)
