import numpy as np

from vlprompt.harness.cli.main import main
from vlprompt.features.cache import FeatureCache


def test_cache_stats_and_clear(tmp_path, capsys):
    with FeatureCache(tmp_path) as cache:
        cache.put_many([("k1", np.ones(4, dtype=np.float32)), ("k2", np.zeros(4, dtype=np.float32))])
    assert main(["cache", "stats", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "features:       2" in out
    assert "feature bytes:  32" in out
    assert main(["cache", "clear", "--dir", str(tmp_path), "--yes"]) == 0
    assert "deleted 2 cached features" in capsys.readouterr().out
    with FeatureCache(tmp_path) as cache:
        assert cache.stats().rows == 0


def test_cache_clear_needs_confirmation_when_not_interactive(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with FeatureCache(tmp_path) as cache:
        cache.put_many([("k1", np.ones(4, dtype=np.float32))])
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 2
    assert "--yes" in capsys.readouterr().err
    with FeatureCache(tmp_path) as cache:
        assert cache.stats().rows == 1


def test_cache_options_open_a_read_only_cache(tmp_path):
    import argparse

    import pytest

    from vlprompt.errors import ConfigError
    from vlprompt.harness.cli.common import add_cache_options, feature_cache_arg

    parser = argparse.ArgumentParser()
    add_cache_options(parser)
    cache = feature_cache_arg(parser.parse_args(["--cache-dir", str(tmp_path), "--cache-read-only"]))
    assert isinstance(cache, FeatureCache) and cache.read_only and cache.root == tmp_path
    assert feature_cache_arg(parser.parse_args(["--cache-dir", str(tmp_path)])) == tmp_path
    with pytest.raises(ConfigError, match="--no-cache excludes"):
        feature_cache_arg(parser.parse_args(["--no-cache", "--cache-read-only"]))
