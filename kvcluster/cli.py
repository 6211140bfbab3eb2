"""The ``kvcluster`` command.

    kvcluster [--config FILE] config show [--json]
    kvcluster [--config FILE] submit "prompt" [--max-tokens N] [--tenant T] [--share public] [--json]
    kvcluster [--config FILE] demo [--families N] [--followups N] [--max-tokens N] [--out DIR]
    kvcluster layers search --model M --ratio R --threshold T ...   (workers.kvsharer)
    kvcluster serve ...                                                (kvcluster.serve_app)

Exit codes: 0 ok, 1 runtime failure, 2 bad usage / bad config / refused request,
3 a component that this installation does not provide.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Sequence

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_MISSING = 0, 1, 2, 3


def _config_arg(p: argparse.ArgumentParser, top: bool) -> None:
    # SUPPRESS on subcommands so that a --config given before the subcommand is not reset
    p.add_argument("--config", "-c", metavar="FILE", default=None if top else argparse.SUPPRESS,
                   help="YAML config file (default: $KVCLUSTER_CONFIG, then KVCLUSTER_* variables)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvcluster", description="Semantic KV-cache reuse for LLM inference.")
    _config_arg(ap, top=True)
    ap.add_argument("--verbose", "-v", action="store_true", help="log at INFO level")
    ap.add_argument("--version", action="version", version="kvcluster " + _version())
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("config", help="show the effective configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    show = csub.add_parser("show", help="print the effective config (file + KVCLUSTER_* environment)")
    _config_arg(show, top=False)
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")

    p = sub.add_parser("submit", help="run one request and print the result")
    _config_arg(p, top=False)
    p.add_argument("prompt", help="the prompt (sent as one user message through the chat template)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tenant", default="default")
    p.add_argument("--share", default="private", help="private (default) or public")
    p.add_argument("--cache-salt", default=None)
    p.add_argument("--address", default=None, help="cluster address (default: embedded)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")

    p = sub.add_parser("demo", help="run a real-prompt workload: semantic reuse vs prefix caching vs full")
    _config_arg(p, top=False)
    from kvcluster.demo import add_arguments
    add_arguments(p)

    p = sub.add_parser("layers", help="KVSharer layer sharing")
    lsub = p.add_subparsers(dest="layers_command", metavar="ACTION")
    lsub.add_parser("search", help="search a layer-sharing strategy (workers.kvsharer)", add_help=False)

    sub.add_parser("serve", help="start the Ray Serve deployment (kvcluster.serve_app)", add_help=False)
    return ap


def _version() -> str:
    from kvcluster import __version__
    return __version__


def _load_config(path: str | None):
    from kvcluster.config import load_config
    return load_config(path)


def _cmd_config(args) -> int:
    if args.config_command != "show":
        print("usage: kvcluster config show [--json]", file=sys.stderr)
        return EXIT_USAGE
    from kvcluster.config import dump_config
    cfg = _load_config(args.config)
    print(json.dumps(cfg.model_dump(), indent=2) if args.json else dump_config(cfg), end="" if not args.json else "\n")
    return EXIT_OK


def _cmd_submit(args) -> int:
    from kvcluster.client import connect
    client = connect(args.address, _load_config(args.config))
    try:
        r = client.submit(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                          tenant=args.tenant, share=args.share, cache_salt=args.cache_salt,
                          top_p=args.top_p, seed=args.seed)
    finally:
        client.close()
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
    else:
        print(r.text)
        print(f"[{r.source}: {r.prompt_tokens} prompt tokens, {r.cached_tokens} cached, "
              f"{r.recomputed_tokens} recomputed; {len(r.token_ids)} generated ({r.finish_reason}); "
              f"TTFT {r.ttft_s * 1e3:.0f} ms, decode {r.decode_s * 1e3:.0f} ms]", file=sys.stderr)
    return EXIT_OK


def _delegate(module: str, funcs: tuple[str, ...], argv: list[str], what: str, **kwargs) -> int:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if e.name and module.startswith(e.name):  # the module itself is missing, not one of its imports
            print(f"kvcluster: {what} is not available in this installation ({module} is missing)",
                  file=sys.stderr)
            return EXIT_MISSING
        raise
    fn = next((getattr(mod, f) for f in funcs if callable(getattr(mod, f, None))), None)
    if fn is None:
        print(f"kvcluster: {what} is not available: {module} has no {' or '.join(funcs)}()", file=sys.stderr)
        return EXIT_MISSING
    rc = fn(argv, **kwargs)
    return int(rc or 0)


def _layers_search(argv: list[str]) -> int:
    from kvcluster.workloads import calibration_paragraphs
    return _delegate("workers.kvsharer", ("layers_search_main",), argv, "kvcluster layers search",
                     default_texts=calibration_paragraphs)


def _quiet_cpu_threads() -> None:
    """Idle OpenMP threads sleep instead of spinning (before torch loads): on a small shared CPU,
    spinning threads of one process steal the cores the others wait for (seen here: an 8-token
    prefill took 3 s with spinning threads under load, 0.1 s with passive ones)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_cpu_threads()
    # delegated commands take their own arguments, untouched
    cmd_at = _command_index(argv)
    if cmd_at is not None:
        cmd, rest = argv[cmd_at], argv[cmd_at + 1:]
        head = argv[:cmd_at]
        if head:
            ns, _ = build_parser().parse_known_args(head)
            if ns.config:
                os.environ["KVCLUSTER_CONFIG"] = ns.config
        if cmd == "serve":
            return _run(lambda: _delegate("kvcluster.serve_app", ("serve_main", "main"), rest, "kvcluster serve"))
        if rest[:1] == ["search"]:
            return _run(lambda: _layers_search(rest[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        build_parser().print_help()
        return EXIT_USAGE
    if args.command == "layers":
        print("usage: kvcluster layers search [--model M] [--ratio R] [--threshold T] ...", file=sys.stderr)
        return EXIT_USAGE
    handlers = {"config": _cmd_config, "submit": _cmd_submit, "demo": _cmd_demo}
    return _run(lambda: handlers[args.command](args))


def _command_index(argv: list[str]) -> int | None:
    """Position of a delegated command (serve, layers search) after the global options."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("serve", "layers"):
            return i
        if a in ("--config", "-c"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return None
    return None


def _cmd_demo(args) -> int:
    from kvcluster.demo import run_from_args
    return run_from_args(args, _load_config(args.config))


def _run(fn) -> int:
    from kvcluster.config import ConfigError
    from kvcluster.types import BackendUnavailableError, ClusterConnectionError, InvalidRequestError
    try:
        return fn()
    except ConfigError as e:
        print(f"kvcluster: {e}", file=sys.stderr)
        return EXIT_USAGE
    except InvalidRequestError as e:
        print(f"kvcluster: request refused ({type(e).__name__}): {e}", file=sys.stderr)
        return EXIT_USAGE
    except BackendUnavailableError as e:
        print(f"kvcluster: {e}", file=sys.stderr)
        return EXIT_MISSING
    except ClusterConnectionError as e:
        print(f"kvcluster: cannot reach the cluster: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("kvcluster: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
