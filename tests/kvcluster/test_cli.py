"""The ``kvcluster`` command: config show, bad configs, refused requests, delegated commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import yaml

from kvcluster import cli


def run_cli(*args, env=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if not k.startswith("KVCLUSTER_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "kvcluster.cli", *args], capture_output=True, text=True,
                          env=e, timeout=timeout)


def test_config_show_prints_the_effective_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("reuse:\n  recompute_ratio: 0.3\nserve:\n  port: 9001\n")
    p = run_cli("--config", str(cfg), "config", "show", env={"KVCLUSTER_REUSE__MODE": "cacheblend"})
    assert p.returncode == 0, p.stderr
    shown = yaml.safe_load(p.stdout)
    assert shown["reuse"]["recompute_ratio"] == 0.3 and shown["reuse"]["mode"] == "cacheblend"
    assert shown["serve"]["port"] == 9001 and shown["model"]["name"] == "smollm2-135m"
    assert set(shown) == {"model", "reuse", "index", "tiers", "serve", "cluster"}


def test_config_show_json_and_option_after_subcommand(tmp_path, capsys, monkeypatch):
    for k in [k for k in os.environ if k.startswith("KVCLUSTER_")]:
        monkeypatch.delenv(k)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("index:\n  top_k: 5\n")
    assert cli.main(["config", "show", "--json", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["index"]["top_k"] == 5


@pytest.mark.parametrize("text,key", [
    ("reuse:\n  mode: magic\n", "reuse.mode"),
    ("index:\n  top_k: 0\n", "index.top_k"),
    ("serve:\n  nonsense: 1\n", "serve.nonsense"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("reuse: [unclosed\n", "not valid YAML"),
])
def test_bad_config_file_fails_and_names_the_key(tmp_path, text, key):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    p = run_cli("--config", str(cfg), "config", "show")
    assert p.returncode != 0
    assert key in p.stderr and "Traceback" not in p.stderr


def test_bad_env_override_and_missing_file(tmp_path):
    p = run_cli("config", "show", env={"KVCLUSTER_TIERS__REDIS_TTL_S": "0"})
    assert p.returncode != 0 and "tiers.redis_ttl_s" in p.stderr
    p = run_cli("config", "show", env={"KVCLUSTER_CONFIG": str(tmp_path / "nope.yaml")})
    assert p.returncode != 0 and "not found" in p.stderr


def test_refused_requests_exit_nonzero_without_loading_a_model(tmp_path):
    p = run_cli("submit", "", "--max-tokens", "4")
    assert p.returncode == 2 and "EmptyPromptError" in p.stderr
    p = run_cli("submit", "hi", "--share", "everyone")
    assert p.returncode == 2 and "UnknownScopeError" in p.stderr
    p = run_cli("submit", "hi", "--max-tokens", "100000")
    assert p.returncode == 2 and "max_tokens" in p.stderr


def test_remote_address_without_backend(monkeypatch, capsys):
    import importlib
    real = importlib.import_module
    monkeypatch.setattr("kvcluster.client.importlib.import_module",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.endswith("ray_client") else real(name, *a, **k))
    assert cli.main(["submit", "hi", "--address", "ray://head:10001"]) == cli.EXIT_MISSING
    assert "ray_client" in capsys.readouterr().err


def test_layers_search_delegates_its_arguments(monkeypatch):
    seen = {}
    fake = types.ModuleType("workers.kvsharer")
    fake.layers_search_main = lambda argv, default_texts=None: (
        seen.update(argv=argv, texts=default_texts(2)) or 0)
    monkeypatch.setitem(sys.modules, "workers.kvsharer", fake)
    assert cli.main(["layers", "search", "--model", "m", "--ratio", "0.25", "--threshold", "0.5"]) == 0
    assert seen["argv"] == ["--model", "m", "--ratio", "0.25", "--threshold", "0.5"]
    assert len(seen["texts"]) == 2  # the CLI supplies the default Wikipedia calibration text


def test_serve_delegates_or_says_it_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kvcluster.serve_app", None)  # import of it fails
    assert cli.main(["serve", "--port", "1"]) == cli.EXIT_MISSING
    assert "kvcluster.serve_app" in capsys.readouterr().err
    seen = {}
    fake = types.ModuleType("kvcluster.serve_app")
    fake.serve_main = lambda argv: seen.setdefault("argv", argv) and None
    monkeypatch.setitem(sys.modules, "kvcluster.serve_app", fake)
    assert cli.main(["serve", "--port", "1"]) == 0 and seen["argv"] == ["--port", "1"]


def test_layers_search_missing_module_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "workers.kvsharer", None)
    assert cli.main(["layers", "search"]) == cli.EXIT_MISSING
    assert "workers.kvsharer" in capsys.readouterr().err


def test_help_and_no_command(capsys):
    assert cli.main([]) == cli.EXIT_USAGE
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0 and "--families" in capsys.readouterr().out
