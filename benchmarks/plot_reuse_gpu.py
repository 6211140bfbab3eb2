"""Plot benchmarks/results/reuse_gpu.json: speedup over full prefill per mode, and its FLOP limit."""
import json
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/reuse_gpu.json")
data = json.loads(src.read_text())
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
modes = [m["mode"] for m in data["rows"][0]["modes"]]
tokens = [r["tokens"] for r in data["rows"]]
for ax, pick in zip(axes, ("speedup", "of_limit")):
    for name in modes:
        ys = [next(m[pick] for m in r["modes"] if m["mode"] == name) for r in data["rows"]]
        ax.plot(tokens, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT speedup over full prefill" if pick == "speedup" else "speedup / FLOP limit")
    ax.grid(alpha=0.3)
axes[0].set_yscale("log")
axes[1].axhline(0.8, color="k", ls="--", lw=1)
axes[0].legend(fontsize=7)
fig.suptitle(f"{data['device']}, Llama-3-8B shape, random bf16 weights ({data['date'][:10]})")
fig.tight_layout()
out = src.with_suffix(".png")
fig.savefig(out, dpi=110)
print(out)
