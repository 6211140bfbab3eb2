"""Plot benchmarks/results/worker_gpu.json: the worker's TTFT per case and prompt length, time per
output token and burst throughput, per configuration (CUDA graphs or eager, batched or not)."""
import json
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/worker_gpu.json")
data = json.loads(src.read_text())
configs = list(data["results"])
lengths = [k for k in data["results"][configs[0]] if k.isdigit()]
cases = ["full", "prefix_hit", "dhd_r0.15@90%"]
fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [3, 1, 1]})
groups = [(n, c) for n in lengths for c in cases]
width = 0.8 / len(configs)
for i, name in enumerate(configs):
    res = data["results"][name]
    xs = [j + i * width for j in range(len(groups))]
    axes[0].bar(xs, [res[n][c]["ttft_ms"] for n, c in groups], width, label=name, color=f"C{i}")
    axes[1].bar(i, res[lengths[0]]["full"]["tpot_ms"], color=f"C{i}")
    axes[2].bar(i, res["bursts"][-1]["tokens_per_s"], color=f"C{i}")
axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{n}\n{c}" for n, c in groups], fontsize=7)
axes[0].set_ylabel("TTFT at the worker, ms")
axes[0].set_yscale("log")
axes[0].legend(fontsize=7)
axes[1].axhline(data["weight_read_ms"], color="k", ls="--", lw=1, label="weights read once")
axes[1].set_ylabel(f"time per output token, ms ({lengths[0]}-token prompt)")
axes[1].legend(fontsize=7)
k = data["results"][configs[0]]["bursts"][-1]["k"]
axes[2].set_ylabel(f"output tokens/s, {k} concurrent requests")
for ax in axes[1:]:
    ax.set_xticks(range(len(configs)), configs, rotation=30, ha="right", fontsize=7)
for ax in axes:
    ax.grid(alpha=0.3, axis="y")
fig.suptitle(f"Worker.generate on {data['device']}, Llama-3-8B shape, random bf16 ({data['date'][:10]})")
fig.tight_layout()
out = src.with_suffix(".png")
fig.savefig(out, dpi=120)
print(out)
