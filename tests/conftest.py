"""Shared fixtures: a tiny synthetic domain written once per test session."""

import pytest


@pytest.fixture(scope="session")
def tiny_domain(tmp_path_factory):
    """A few dozen 64x32 synthetic images in Market-1501 layout (folder path)."""
    from qaconv.data.synth import generate_domain

    root = tmp_path_factory.mktemp("data") / "synth_A"
    generate_domain("A", root, seed=0, num_train_ids=8, num_test_ids=6, height=64, width=32, progress=False)
    return root
