"""Shared fixtures: a tiny synthetic domain written once per test session."""

import pytest


@pytest.fixture(scope="session")
def tiny_domain(tmp_path_factory):
    """A few dozen 64x32 synthetic images in Market-1501 layout (folder path)."""
    from qaconv.data.synth import generate_domain

    root = tmp_path_factory.mktemp("data") / "synth_A"
    generate_domain("A", root, seed=0, num_train_ids=8, num_test_ids=6, height=64, width=32, progress=False)
    return root


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The whole session (and the subprocesses it starts) caches under a temporary folder, never in the real
    ~/.cache; and no test may generate a synthetic domain there without naming it (each test that means to
    sets its own XDG_CACHE_HOME)."""
    import os

    cache = tmp_path_factory.mktemp("xdg_cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
    written = sorted(p.name for p in (cache / "qaconv").glob("*")) if (cache / "qaconv").is_dir() else []
    assert not written, f"tests generated data into the default cache folder: {written}"
