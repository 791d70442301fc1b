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
