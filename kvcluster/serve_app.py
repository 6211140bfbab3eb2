"""The Ray Serve app: an OpenAI-compatible HTTP API in front of the kvcluster workers.

Endpoints
  POST /v1/completions         text (or token-id) prompts, ``stream`` via SSE
  POST /v1/chat/completions    chat messages through the model's chat template, ``stream`` via SSE
  GET  /v1/models              the served model
  GET  /metrics                Prometheus text, every series prefixed ``kvcluster:`` (kvcluster/metrics.py)
  GET  /health                 liveness and workers up

Behaviour
  * ``Authorization: Bearer <key>``: ``serve.api_keys`` maps keys to tenants on the server; a
    ``tenant`` field in the body is ignored. With no keys configured every caller is tenant
    "default" (a development setup; configure keys for anything shared).
  * ``cache_salt`` (optional, body): reuse only KV stored with the same salt. ``share``
    ("private" default, or "public"): whether other tenants may reuse this prompt's KV.
  * ``usage.prompt_tokens_details.cached_tokens`` = prompt tokens whose KV came from the cache
    and was kept as it was (reused minus DHD-recomputed); more in the ``kvcluster`` field.
  * Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: malformed JSON
    or wrong types 400, ``max_tokens`` over ``serve.max_tokens_limit`` 400, prompt over the context
    400 (code ``context_length_exceeded``), bad key 401, unknown model 404, more than
    ``serve.max_queue`` requests in the server 429 with ``Retry-After``, no worker up 503.
  * Defaults: ``temperature`` 1.0 as OpenAI's; ``max_tokens`` 16 for completions (OpenAI's) and
    ``min(256, serve.max_tokens_limit)`` for chat (OpenAI's "until the context is full" would let one
    request hold a CPU worker for minutes). ``n`` must be 1; logprobs/echo/suffix/best_of are refused.

Topology: one ingress replica owns the scheduler (cache-aware routing needs one view of who
holds what) and starts the index actor and the worker actors (``kvcluster/ray_client.py``), which
live as long as it does. Workers are plain Ray actors, not Serve replicas, because the router,
not Serve's power-of-two router, must pick the worker.

``app_builder(args)`` is for ``serve run kvcluster.serve_app:app_builder config=cluster.yaml`` and
Serve config files; ``serve_main(argv)`` (also ``main``) is ``kvcluster serve --config cluster.yaml``.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from kvcluster.config import ConfigError, KVClusterConfig, config_from_dict, load_config
from kvcluster.metrics import Metrics
from kvcluster.types import (InvalidRequestError, PromptTooLongError, as_config, prompt_text,
                             validate_request)

log = logging.getLogger(__name__)

APP_NAME = "kvcluster"
MAX_BODY_BYTES = 8 << 20
MAX_STOPS = 4
CHAT_DEFAULT_MAX_TOKENS = 256
_UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
                "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}), "tools": (None, []),
                "functions": (None, []), "response_format": (None, {"type": "text"})}
_IGNORED = {"user", "tenant", "frequency_penalty", "presence_penalty", "metadata", "store", "service_tier",
            "parallel_tool_calls", "tool_choice", "function_call", "modalities", "reasoning_effort",
            "prediction", "audio"}

app = FastAPI(title="kvcluster", description="Semantic KV-cache reuse behind an OpenAI-compatible API")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Detokenizer:
    """Incremental text of generated tokens, holding back what could still become a stop string
    (or half of a multi-byte character)."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tok = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        if self.stops:
            hits = [i for i in (text.find(s, self.sent) for s in self.stops) if i >= 0]
            if hits:
                cut = min(hits)
                delta, self.text, self.sent, self.stopped = text[self.sent:cut], text[:cut], cut, True
                return delta
        safe = len(text) - self.hold
        if safe > self.sent:
            delta, self.sent = text[self.sent:safe], safe
            return delta
        return ""

    def flush(self) -> str:
        if not self.stopped:
            self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


class KVClusterServer:
    """The ingress: validation, auth, tokenizing, and the router of the Ray cluster."""

    def __init__(self, config: dict | None = None, cluster_kwargs: dict | None = None) -> None:
        from kvcluster.ray_client import RayCluster
        from workers.model_loader import load_tokenizer

        self.cfg: KVClusterConfig = as_config(config if config is not None else None)
        cfg = self.cfg
        self.metrics = Metrics()
        self.tokenizer = load_tokenizer(cfg.model.name, cfg.model.gguf_file)
        self.cluster = RayCluster(cfg, **(cluster_kwargs or {}))
        self.model_names = {cfg.model.name, self.cluster.infos["w0"]["model"]}
        self.model_id = cfg.model.name
        self._keys = {str(k): str(v) for k, v in cfg.serve.api_keys.items()}
        self._active = 0
        self._retries_seen = 0
        self._service_s = 5.0  # running mean of request time, for Retry-After

    # -- plumbing --------------------------------------------------------------------------------
    def _tenant(self, request: Request) -> str:
        if not self._keys:
            return "default"
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        key = key.strip()
        if scheme.lower() == "bearer" and key:
            for k, tenant in self._keys.items():
                if hmac.compare_digest(k.encode(), key.encode()):
                    return tenant
        raise APIError(401, "Incorrect API key provided." if key else "Missing API key: send 'Authorization: "
                       "Bearer <key>'.", code="invalid_api_key")

    async def _json(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise _bad(f"request body of {len(raw)} bytes is over the limit of {MAX_BODY_BYTES}")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise _bad("request body must be a JSON object")
        return body

    def _admit(self) -> None:
        if self._active >= self.cfg.serve.max_queue:
            from kvcluster.ray_client import retry_after_s
            up = len(self.cluster.scheduler.up_workers())
            wait = retry_after_s(self._active, up, self._service_s)
            raise APIError(429, f"the server has {self._active} requests in progress (serve.max_queue = "
                           f"{self.cfg.serve.max_queue}); retry later", type_="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(wait)})

    def _tokenize_chat(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return list(tok(text)["input_ids"])

    def _parse(self, body: dict, chat: bool, tenant: str):
        from workers.scheduler import RouterRequest
        cfg = self.cfg
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _bad("'model' must be a string", "model")
        if model is not None and model not in self.model_names:
            raise APIError(404, f"The model '{model:.100}' does not exist; this server runs '{self.model_id}'.",
                           param="model", code="model_not_found")
        for k, allowed in _UNSUPPORTED.items():
            if k in body and body[k] not in allowed:
                raise _bad(f"'{k}' is not supported by this server", k, "unsupported_parameter")
        n = body.get("n", 1)
        if n is not None and n != 1:
            raise _bad("only n = 1 is supported", "n", "unsupported_parameter")
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = min(CHAT_DEFAULT_MAX_TOKENS, cfg.serve.max_tokens_limit) if chat else 16
        temperature = body.get("temperature", 1.0)
        temperature = 1.0 if temperature is None else temperature
        top_p = body.get("top_p", 1.0)
        top_p = 1.0 if top_p is None else top_p
        seed, salt, share = body.get("seed"), body.get("cache_salt"), body.get("share", "private")
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise _bad("'stream' must be a boolean", "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise _bad("'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
            raise _bad(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
        if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 2:
            raise _bad("'temperature' must be in [0, 2]", "temperature")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise _bad("'messages' must be a list of chat messages", "messages")
            messages = [_flatten_message(m, i) for i, m in enumerate(messages)]
            req = validate_request(messages, max_tokens, temperature, tenant, share, salt, top_p, seed, config=cfg)
            ids, text = self._tokenize_chat(req.prompt), prompt_text(req.prompt)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch of one
            if isinstance(prompt, list):
                if not prompt or not all(_is_int(t) and t >= 0 for t in prompt):
                    raise _bad("'prompt' must be a string or a non-empty list of token ids", "prompt")
                if len(prompt) > cfg.serve.max_prompt_chars:
                    raise _bad("the prompt has too many tokens", "prompt", "context_length_exceeded")
                req = validate_request("-", max_tokens, temperature, tenant, share, salt, top_p, seed, config=cfg)
                ids, text = list(prompt), self.tokenizer.decode(prompt)
            elif isinstance(prompt, str):
                req = validate_request(prompt, max_tokens, temperature, tenant, share, salt, top_p, seed, config=cfg)
                ids, text = list(self.tokenizer(prompt)["input_ids"]), prompt
            else:
                raise _bad("'prompt' must be a string or a list of token ids", "prompt")
        if len(ids) + req.max_tokens > self.cluster.max_context:
            raise _bad(f"This model's maximum context length is {self.cluster.max_context} tokens. However, you "
                       f"requested {len(ids) + req.max_tokens} tokens ({len(ids)} in the prompt, {req.max_tokens} "
                       f"for the completion).", "messages" if chat else "prompt", "context_length_exceeded")
        rreq = RouterRequest(token_ids=ids, text=text, tenant=req.tenant, scope=req.share, cache_salt=req.cache_salt,
                             max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                             reuse=self.cluster.reuse, write_back=self.cluster.reuse)
        return rreq, stops, bool(stream), bool(opts.get("include_usage", False))

    async def _events(self, rreq, stops: list[str], t0: float) -> AsyncIterator[tuple[str, Any]]:
        """("delta", text) as text is ready, then ("end", summary)."""
        router = self.cluster.router
        dec = _Detokenizer(self.tokenizer, stops)
        ttft, prefill, done = None, None, None
        agen = router.stream(rreq)
        try:
            async for ev in agen:
                kind = ev["type"]
                if kind == "prefill":
                    prefill = ev
                elif kind == "token":
                    if dec.stopped:
                        continue
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                        self.metrics.observe_prefill(prefill or {}, ttft)
                    delta = dec.add(ev["token_id"])
                    if delta:
                        yield "delta", delta
                    if dec.stopped:
                        await router.cancel(rreq.request_id)
                elif kind == "done":
                    done = ev
        finally:
            await agen.aclose()
        tail = dec.flush()
        if tail:
            yield "delta", tail
        done = done or {}
        prefill = prefill or {}
        if ttft is None:  # no token at all (max_tokens 0 cannot happen here, but a cancelled run can)
            ttft = time.perf_counter() - t0
            self.metrics.observe_prefill(prefill, ttft)
        e2e = time.perf_counter() - t0
        n_out = len(dec.ids)
        self.metrics.observe_done(dict(done, completion_tokens=n_out), ttft, e2e)
        self._service_s = 0.9 * self._service_s + 0.1 * e2e
        reason = "stop" if dec.stopped else ("stop" if done.get("finish_reason") == "stop" else "length")
        yield "end", {"text": dec.text, "token_ids": list(dec.ids), "finish_reason": reason,
                      "ttft_s": ttft, "e2e_s": e2e, "prefill": prefill, "done": done}

    def _usage(self, rreq, end: dict) -> dict:
        p = end["prefill"]
        n_in, n_out = len(rreq.token_ids), len(end["token_ids"])
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out,
                "prompt_tokens_details": {"cached_tokens": int(p.get("cached_tokens", 0))}}

    def _extra(self, end: dict) -> dict:
        p, d = end["prefill"], end["done"]
        f = p.get("fetch") or {}
        return {"reused_tokens": p.get("reused_tokens", 0), "recomputed_tokens": p.get("recomputed_tokens", 0),
                "cached_tokens": p.get("cached_tokens", 0), "source": p.get("source", "miss"),
                "donor_ids": p.get("donor_ids", []), "segment_id": d.get("segment_id"),
                "worker": p.get("worker"), "workers": d.get("workers", []), "attempts": d.get("attempts", 1),
                "ttft_s": end["ttft_s"], "e2e_s": end["e2e_s"], "lookup_s": p.get("lookup_s", 0.0),
                "prefill_s": p.get("prefill_s", 0.0), "queue_s": d.get("queue_s", 0.0),
                "decode_s": d.get("decode_s", 0.0), "flops_fraction": p.get("flops_fraction", 1.0),
                "fallback": p.get("fallback"), "token_ids": end["token_ids"],
                "fetch": {k: f.get(k) for k in ("local", "fetched", "dropped", "missing", "peer_blocks",
                                                  "peer_bytes", "peer_s", "channel")}}

    async def _handle(self, request: Request, chat: bool):
        t0 = time.perf_counter()
        endpoint = "chat_completions" if chat else "completions"
        try:
            tenant = self._tenant(request)
            body = await self._json(request)
            rreq, stops, stream, include_usage = self._parse(body, chat, tenant)
            self._admit()
        except APIError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            return e.response()
        except InvalidRequestError as e:
            self.metrics.requests.labels(endpoint, "400").inc()
            code = "context_length_exceeded" if isinstance(e, PromptTooLongError) else None
            return _bad(str(e), code=code).response()
        rid = ("chatcmpl-" if chat else "cmpl-") + rreq.request_id
        created = int(time.time())
        if stream:  # counted from when the stream starts: a client gone before that costs nothing
            return StreamingResponse(self._sse(rreq, stops, t0, chat, rid, created, include_usage, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        self._active += 1
        try:
            end = None
            async for kind, payload in self._events(rreq, stops, t0):
                if kind == "end":
                    end = payload
        except Exception as e:  # noqa: BLE001 - mapped to an OpenAI error
            err = self._error_of(e)
            self.metrics.requests.labels(endpoint, str(err.status)).inc()
            return err.response()
        finally:
            self._active -= 1
        self.metrics.requests.labels(endpoint, "200").inc()
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": end["text"]},
                      "logprobs": None, "finish_reason": end["finish_reason"]}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": end["text"], "logprobs": None, "finish_reason": end["finish_reason"]}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_id,
                             "choices": [choice], "usage": self._usage(rreq, end), "kvcluster": self._extra(end)},
                            headers={"X-Request-Id": rid})

    async def _sse(self, rreq, stops, t0, chat, rid, created, include_usage, endpoint) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                c = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": self.model_id,
                                          "choices": [c]}) + "\n\n"

        status = "200"
        self._active += 1
        try:
            if chat:
                yield chunk(None, role=True)
            async for kind, payload in self._events(rreq, stops, t0):
                if kind == "delta":
                    yield chunk(payload)
                else:
                    yield chunk(None if chat else "", finish=payload["finish_reason"])
                    if include_usage:
                        yield "data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                                     "model": self.model_id, "choices": [],
                                                     "usage": self._usage(rreq, payload),
                                                     "kvcluster": self._extra(payload)}) + "\n\n"
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = "499"  # the client went away
            raise
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            err = self._error_of(e)
            status = str(err.status)
            yield "data: " + json.dumps(err.body()) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._active -= 1
            self.metrics.requests.labels(endpoint, status).inc()

    def _error_of(self, e: BaseException) -> APIError:
        from workers.scheduler import NoWorkerError
        if isinstance(e, APIError):
            return e
        if isinstance(e, InvalidRequestError):
            return _bad(str(e), code="context_length_exceeded" if isinstance(e, PromptTooLongError) else None)
        if isinstance(e, NoWorkerError):
            return APIError(503, "no worker is available; retry later", type_="server_error",
                            code="service_unavailable", headers={"Retry-After": "5"})
        log.exception("request failed")
        return APIError(500, f"internal error ({type(e).__name__})", type_="server_error", code="internal_error")

    # -- HTTP routes -------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._tenant(request)
        except APIError as e:
            return e.response()
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                            "owned_by": "kvcluster"}]}

    @app.get("/health")
    async def health(self):
        return {"status": "ok", "workers_up": len(self.cluster.scheduler.up_workers()),
                "workers": len(self.cluster.handles)}

    @app.get("/metrics")
    async def metrics_endpoint(self):
        await self._refresh_metrics()
        body, ctype = self.metrics.render()
        return Response(content=body, media_type=ctype)

    async def _refresh_metrics(self) -> None:
        self.metrics.set_worker_stats(await self.cluster.worker_stats())
        sched = self.cluster.scheduler
        snap = sched.snapshot()["workers"]
        self.metrics.set_router_stats(sum(w["running"] for w in snap.values()),
                                      sum(w["queued"] for w in snap.values()), len(sched.up_workers()))
        retries = self.cluster.router.dispatcher.retries
        if retries > self._retries_seen:
            self.metrics.retries.inc(retries - self._retries_seen)
            self._retries_seen = retries

    # -- Python API (DeploymentHandle; kvcluster.ray_client.RayClient) -----------------------------
    async def submit(self, p: dict) -> dict:
        """One request from a trusted in-cluster client (the tenant is taken as given)."""
        from workers.scheduler import RouterRequest
        t0 = time.perf_counter()
        req = validate_request(p["prompt"], p.get("max_tokens", 64), p.get("temperature", 0.0),
                               p.get("tenant", "default"), p.get("share", "private"), p.get("cache_salt"),
                               p.get("top_p", 1.0), p.get("seed"), config=self.cfg)
        messages = [{"role": "user", "content": req.prompt}] if isinstance(req.prompt, str) else req.prompt
        ids = self._tokenize_chat(messages)
        if len(ids) + req.max_tokens > self.cluster.max_context:
            raise PromptTooLongError(f"{len(ids)} prompt tokens + {req.max_tokens} new tokens exceed the context "
                                     f"of {self.cluster.max_context} tokens")
        self._admit()
        self._active += 1
        try:
            rreq = RouterRequest(token_ids=ids, text=req.text, tenant=req.tenant, scope=req.share,
                                 cache_salt=req.cache_salt, max_tokens=req.max_tokens, temperature=req.temperature,
                                 top_p=req.top_p, seed=req.seed, pin=p.get("pin"), reuse=self.cluster.reuse,
                                 write_back=self.cluster.reuse)
            end = None
            async for kind, payload in self._events(rreq, [], t0):
                if kind == "end":
                    end = payload
        finally:
            self._active -= 1
        self.metrics.requests.labels("submit", "200").inc()
        pre, done = end["prefill"], end["done"]
        extra = self._extra(end)
        return {"text": end["text"], "token_ids": end["token_ids"], "prompt_tokens": len(ids),
                "cached_tokens": pre.get("cached_tokens", 0), "recomputed_tokens": pre.get("recomputed_tokens", 0),
                "source": pre.get("source", "miss"), "ttft_s": end["ttft_s"], "decode_s": done.get("decode_s", 0.0),
                "finish_reason": end["finish_reason"], "segment_id": done.get("segment_id"),
                "donor_ids": pre.get("donor_ids", []), "tenant": req.tenant, "lookup_s": pre.get("lookup_s", 0.0),
                "prefill_s": pre.get("prefill_s", 0.0), "decode_recomputed": done.get("decode_recomputed", 0),
                "flops_fraction": pre.get("flops_fraction", 1.0), "fallback": pre.get("fallback"),
                "worker": extra["worker"], "workers": extra["workers"], "attempts": extra["attempts"],
                "fetch": extra["fetch"], "reused_tokens": pre.get("reused_tokens", 0)}

    async def cluster_stats(self) -> dict:
        return {"router": self.cluster.router.stats(), "workers": await self.cluster.worker_stats(),
                "fingerprint": self.cluster.fingerprint}

    async def kill_worker(self, worker: str, restart: bool = True) -> None:
        self.cluster.kill_worker(worker, restart)

    def __del__(self) -> None:
        try:
            self.cluster.shutdown()
        except Exception:  # noqa: BLE001
            pass


def _flatten_message(m: Any, i: int) -> Any:
    """OpenAI content parts ([{"type": "text", "text": ...}]) -> one string; other shapes pass through
    to validate_request, which names what is wrong."""
    if isinstance(m, dict) and isinstance(m.get("content"), list):
        parts = m["content"]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        m = dict(m, content="".join(p["text"] for p in parts))
    return m


KVClusterDeployment = serve.deployment(name="KVClusterServer", num_replicas=1,
                                       ray_actor_options={"num_cpus": 0})(serve.ingress(app)(KVClusterServer))


def build_app(config: Any = None, cluster_kwargs: dict | None = None):
    """The bound Serve application for a config (KVClusterConfig, mapping, YAML path or None)."""
    cfg = as_config(config)
    return KVClusterDeployment.options(max_ongoing_requests=cfg.serve.max_queue + 32).bind(
        cfg.model_dump(), cluster_kwargs or {})


def app_builder(args: dict[str, str]):
    """``serve run kvcluster.serve_app:app_builder [config=cluster.yaml]`` (and Serve config files'
    ``import_path`` + ``args``). Without ``config``: ``$KVCLUSTER_CONFIG`` and ``KVCLUSTER_*``."""
    args = dict(args or {})
    path = args.pop("config", None)
    cluster_kwargs = {}
    for k in ("worker_num_cpus", "worker_num_gpus"):
        if k in args:
            cluster_kwargs[k] = float(args.pop(k))
    if args:
        raise ConfigError(f"unknown app arguments {sorted(args)}; use config=FILE (and worker_num_cpus, "
                          f"worker_num_gpus)")
    cfg = load_config(path) if path else load_config()
    return build_app(cfg, cluster_kwargs)


def serve_main(argv: list[str] | None = None) -> int:
    """``kvcluster serve [--config FILE] [--address A] [--host H] [--port P]``: start (or join) Ray,
    deploy the app, serve until interrupted."""
    ap = argparse.ArgumentParser(prog="kvcluster serve", description="Serve kvcluster over an OpenAI-compatible API")
    ap.add_argument("--config", "-c", default=None, help="YAML config (default: $KVCLUSTER_CONFIG)")
    ap.add_argument("--address", default=None,
                    help="Ray address: none = start a local Ray, 'auto', or 'ray://host:port' (default: cluster.address)")
    ap.add_argument("--host", default=None, help="HTTP host (default: serve.host)")
    ap.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray")
    ap.add_argument("--worker-num-cpus", type=float, default=1.0, help="CPUs each worker actor reserves")
    ap.add_argument("--app-name", default=APP_NAME)
    ap.add_argument("--no-block", action="store_true", help="deploy and return (the app keeps running)")
    args = ap.parse_args(argv)
    import ray

    cfg = load_config(args.config)
    host, port = args.host or cfg.serve.host, args.port or cfg.serve.port
    address = args.address if args.address is not None else cfg.cluster.address
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address in (None, "", "embedded", "local"):
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    else:
        ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg, {"worker_num_cpus": args.worker_num_cpus}), name=args.app_name, route_prefix="/",
              blocking=False)
    print(f"kvcluster: serving {cfg.model.name} on http://{host}:{port}/v1 "
          f"({cfg.cluster.num_workers} workers, scheduler {cfg.cluster.scheduler})", flush=True)
    if args.no_block:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("kvcluster: shutting down", file=sys.stderr)
        serve.delete(args.app_name)
        return 0


main = serve_main
