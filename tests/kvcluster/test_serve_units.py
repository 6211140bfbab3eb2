"""Pieces of the Serve app that need no cluster: stop strings, error shape, message parts, metrics."""
from __future__ import annotations

import pytest

from kvcluster.serve_app import APIError, _Detokenizer, _flatten_message


class CharTokenizer:
    """Token id = a character's code point; id 0 is a special token (skipped)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0 or not skip_special_tokens)


def feed(text, stops):
    d = _Detokenizer(CharTokenizer(), stops)
    out = []
    for ch in text:
        out.append(d.add(ord(ch)))
        if d.stopped:
            break
    out.append(d.flush())
    return "".join(out), d


def test_stop_string_cuts_and_nothing_past_it_is_sent():
    text, d = feed("hello world. bye", ["world"])
    assert text == "hello " and d.stopped and d.text == "hello "
    text, d = feed("abcabd", ["abd", "zz"])
    assert text == "abc" and d.stopped


def test_without_stops_every_character_goes_out_once():
    text, d = feed("plain text", [])
    assert text == "plain text" and not d.stopped
    text, d = feed("no stop here", ["xyz"])
    assert text == "no stop here" and not d.stopped


def test_held_back_text_is_released_at_the_end():
    d = _Detokenizer(CharTokenizer(), ["STOP"])
    sent = "".join(d.add(ord(c)) for c in "ab ST")
    assert sent == "ab"  # " ST" could still become "STOP"
    assert d.flush() == " ST"


def test_error_shape_is_openais():
    e = APIError(429, "slow down", type_="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "3"})
    r = e.response()
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    assert e.body() == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                                  "code": "rate_limit_exceeded"}}


def test_content_parts_are_joined_and_non_text_parts_refused():
    m = _flatten_message({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, 0)
    assert m == {"role": "user", "content": "ab"}
    with pytest.raises(APIError):
        _flatten_message({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, 0)


def test_metrics_render_with_the_prefix_and_worker_tiers():
    from prometheus_client.parser import text_string_to_metric_families

    from kvcluster.metrics import Metrics
    m = Metrics()
    m.observe_prefill({"prompt_tokens": 10, "reused_tokens": 8, "cached_tokens": 6, "recomputed_tokens": 2,
                       "computed_tokens": 2, "fetch": {"peer_blocks": 2, "peer_bytes": 1000, "peer_s": 0.01,
                                                        "channel": "ray", "dropped": ["x"]}}, 0.2)
    m.observe_done({"completion_tokens": 5, "queue_s": 0.1}, 0.2, 1.0)
    m.set_worker_stats({"w0": {"tier_used_bytes": {"host": 123}, "tiers": {"host": {"hits": 3, "misses": 1},
                                                                          "store": {"write_dropped": 0}},
                               "batching": {"decode_steps": 10, "graph_steps": 7, "capture_failures": 1,
                                            "blocks_total": 8, "blocks_free": 6}},
                        "w1": {"batching": None}})
    body, ctype = m.render()
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert all(n.startswith("kvcluster:") for n in fams)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("kvcluster:reused_tokens_total", ())] == 8
    assert samples[("kvcluster:transfer_bytes_total", (("channel", "ray"),))] == 1000
    assert samples[("kvcluster:tier_bytes", (("tier", "host"), ("worker", "w0")))] == 123
    assert samples[("kvcluster:tier_hits_total", (("tier", "host"), ("worker", "w0")))] == 3
    assert samples[("kvcluster:transfer_failures_total", ())] == 1
    assert samples[("kvcluster:time_per_output_token_seconds_count", ())] == 1
    assert samples[("kvcluster:batched_decode_steps_total", (("path", "graph"), ("worker", "w0")))] == 7
    assert samples[("kvcluster:batched_decode_steps_total", (("path", "eager"), ("worker", "w0")))] == 3
    assert samples[("kvcluster:graph_capture_failures_total", (("worker", "w0"),))] == 1
    assert samples[("kvcluster:kv_block_usage", (("worker", "w0"),))] == 0.25
    assert not any(dict(k[1]).get("worker") == "w1" for k in samples)  # no batcher there: no series
