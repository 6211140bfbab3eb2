"""A Worker that kills its own process at a random point of a random request (fault injection for
the worker-kill runs). Imported by the Ray actor processes (PYTHONPATH = the repository root).

With probability ``KVREL_KILL_P`` a request is picked to die in one of three phases, chosen
uniformly: "fetch" (in the middle of reading the plan's donors, only for requests with a plan),
"prefill" (inside the DHD prefill, after the donor KV was placed, or inside a full prefill when
there is no reuse), "decode" (after a random number of generated tokens). The process exits with
``os._exit`` (no cleanup, as a crash or an OOM kill would) after appending the phase to
``KVREL_KILL_LOG``.
"""
from __future__ import annotations

import os
import random

from workers.worker_actor import Worker


class ChaosWorker(Worker):
    def __init__(self, worker_id="w0", options=None, runner=None) -> None:
        super().__init__(worker_id, options, runner)
        self._p = float(os.environ.get("KVREL_KILL_P", "0"))
        self._log = os.environ.get("KVREL_KILL_LOG")
        self._rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
        self._plan: tuple[str, int] | None = None
        self._step = 0
        eng = self.engine
        checked, full, decode = eng._checked, eng._full, eng.decode_step

        def _checked(*a, **k):
            self._maybe("prefill", "dhd")
            return checked(*a, **k)

        def _full(*a, **k):
            self._maybe("prefill", "full_prefill")
            return full(*a, **k)

        def decode_step(*a, **k):
            self._step += 1
            if self._plan is not None and self._plan[0] == "decode" and self._step >= self._plan[1]:
                self._die("decode")
            return decode(*a, **k)

        eng._checked, eng._full, eng.decode_step = _checked, _full, decode_step
        if self._batcher is not None:  # a batched decode step is a decode step too
            paged = self._batcher._paged_step

            def paged_step(*a, **k):
                self._step += 1
                if self._plan is not None and self._plan[0] == "decode" and self._step >= self._plan[1]:
                    self._die("decode")
                return paged(*a, **k)

            self._batcher._paged_step = paged_step
        seg_get = self.segments.get

        def get(segment_id):
            self._maybe("fetch", "fetch")
            return seg_get(segment_id)

        self.segments.get = get

    def _maybe(self, phase: str, label: str) -> None:
        if self._plan is not None and self._plan[0] == phase:
            self._die(label)

    def _die(self, label: str) -> None:
        if self._log:
            with open(self._log, "a") as f:
                f.write(f"{label}\n")
        os._exit(1)

    def generate_stream(self, request):
        self._plan, self._step = None, 0
        if self._p > 0 and self._rng.random() < self._p:
            plan = request.get("plan") if isinstance(request, dict) else None
            phases = ["prefill", "decode"] + (["fetch"] if plan and plan.get("spans") else [])
            mt = request.get("max_tokens", 1) if isinstance(request, dict) else 1
            phase = self._rng.choice(phases)
            if phase == "decode" and mt < 2:
                phase = "prefill"
            self._plan = (phase, self._rng.randint(1, max(1, mt - 1)))
        yield from super().generate_stream(request)
