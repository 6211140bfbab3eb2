"""Plot benchmarks/results/reuse_gpu.json: speedup over full prefill per mode, its fraction of the
FLOP limit, and its fraction of the roofline (FLOPs over peak or bytes over bandwidth)."""
import json
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/reuse_gpu.json")
data = json.loads(src.read_text())
picks = ("speedup", "of_limit", "of_roofline") if "of_roofline" in data["rows"][0]["modes"][0] else ("speedup", "of_limit")
fig, axes = plt.subplots(1, len(picks), figsize=(6 * len(picks), 4.5))
labels = {"speedup": "TTFT speedup over full prefill", "of_limit": "speedup / FLOP limit",
          "of_roofline": "roofline time / measured time"}
modes = [m["mode"] for m in data["rows"][0]["modes"]]
tokens = [r["tokens"] for r in data["rows"]]
for ax, pick in zip(axes, picks):
    shown = [n for n in modes if not (pick == "of_limit" and n.startswith("prefix"))]
    # (prefix modes compute one token: a FLOP limit of n x says nothing, see of_roofline)
    if len(tokens) == 1:  # one prompt length (a partial run): bars per mode
        ys = [next(m[pick] for m in data["rows"][0]["modes"] if m["mode"] == n) for n in shown]
        ax.bar(range(len(shown)), ys, color=[f"C{modes.index(n)}" for n in shown])
        ax.set_xticks(range(len(shown)), shown, rotation=45, ha="right", fontsize=7)
        ax.set_xlabel(f"{tokens[0]} prompt tokens")
    else:
        for name in shown:
            ys = [next(m[pick] for m in r["modes"] if m["mode"] == name) for r in data["rows"]]
            ax.plot(tokens, ys, marker="o", label=name, color=f"C{modes.index(name)}")  # same colour in every panel
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
    ax.set_ylabel(labels[pick])
    ax.grid(alpha=0.3)
axes[0].set_yscale("log")
axes[1].axhline(0.8, color="k", ls="--", lw=1)
if len(tokens) > 1:
    axes[0].legend(fontsize=7)
fig.suptitle(f"{data['device']}, Llama-3-8B shape, random bf16 weights ({data['date'][:10]})")
fig.tight_layout()
out = src.with_suffix(".png")
fig.savefig(out, dpi=110)
print(out)
