"""Checkpoints, the epoch schedule, transforms and chunked matching."""

import os

import pytest
import torch

from qaconv.data.transforms import RandomOcclusion, train_transform
from qaconv.engine.checkpoint import load_checkpoint, save_checkpoint
from qaconv.engine.schedule import EpochSchedule
from qaconv.errors import QAConvError
from qaconv.matching import pairwise_scores


def test_checkpoint_roundtrip_and_atomic(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint({"epoch": 3, "w": torch.arange(4.0), "config": {"a": 1}}, path)
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    # the permissions a plain open() would give (umask), not the temporary file's private 0600
    old = os.umask(0o022)
    try:
        save_checkpoint({"epoch": 4}, path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


class _Evil:
    """Unpickling this would run a command: weights-only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(QAConvError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(QAConvError, match="corrupt or not a qaconv checkpoint"):
        load_checkpoint(bad)
    for name, payload in (("random.pt", os.urandom(5000)), ("pickle.pt", None)):
        path = tmp_path / name
        if payload is None:  # a pickle holding an arbitrary object: refused, never unpickled
            torch.save({"format": "qaconv-checkpoint-1", "x": _Evil()}, path)
        else:
            path.write_bytes(payload)
        with pytest.raises(QAConvError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert "corrupt or not a qaconv checkpoint" in message and "\n" not in message
        assert "weights_only" not in message and "trust" not in message  # never suggests unsafe loading
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(QAConvError, match="not a qaconv checkpoint"):
        load_checkpoint(foreign)


def test_adaptive_schedule_decays_once_and_extends_by_half():
    s = EpochSchedule(step_factor=0.7, max_epochs=60)
    losses = [10.0, 8.0, 7.0, 6.0, 5.5, 3.0, 2.0, 1.0]
    decays = [s.end_epoch(e, loss) for e, loss in enumerate(losses, start=1)]
    # base = epoch-2 loss 8.0; first loss < 5.6 is epoch 5 (5.5): stop at 5 + 2 = 7
    assert decays == [False, False, False, False, True, False, False, False]
    assert s.final_epochs == 7 and s.done(7) and not s.done(6)


def test_adaptive_schedule_respects_cap_and_fixed_mode():
    s = EpochSchedule(step_factor=0.7, max_epochs=5)
    for e, loss in enumerate([10, 10, 9, 1], start=1):
        s.end_epoch(e, loss)
    assert s.final_epochs == 5  # min(5, 4 + 2)
    f = EpochSchedule(step_factor=3, max_epochs=6)
    assert [f.end_epoch(e, 1.0) for e in range(1, 7)] == [False, False, True, False, False, False]
    assert f.final_epochs == 6


def test_occlusion_is_white_square_within_bounds():
    torch.manual_seed(0)
    occ = RandomOcclusion(0.0, 0.8)
    for _ in range(50):
        out = occ(torch.zeros(3, 32, 16))
        ys, xs = torch.nonzero(out[0] == 1.0, as_tuple=True)
        assert len(ys) > 0
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert h == w and 1 <= h < int(16 * 0.8) and len(ys) == h * w
        assert torch.all(out[:, ys, xs] == 1.0)


def test_train_transform_shape_and_range():
    from PIL import Image

    img = Image.new("RGB", (30, 70), (200, 10, 10))
    out = train_transform(64, 32)(img)
    assert out.shape == (3, 64, 32) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


class _Dot(torch.nn.Module):
    def forward(self, prob, gal):
        return prob.flatten(1) @ gal.flatten(1).T


def test_pairwise_scores_chunks_equal_direct():
    prob, gal = torch.randn(7, 3, 2, 2), torch.randn(11, 3, 2, 2)
    direct = _Dot()(prob, gal)
    chunked = pairwise_scores(_Dot(), prob, gal, prob_batch=3, gal_batch=4, device="cpu")
    torch.testing.assert_close(chunked, direct)


def test_a_failed_write_keeps_the_old_file_and_says_why(tmp_path):
    import errno

    from qaconv.engine.checkpoint import atomic_write

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1}, path)
    old = path.read_bytes()

    def disk_full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(QAConvError, match=r"cannot write .*checkpoint\.pt: No space left on device; the previous"):
        atomic_write(path, disk_full)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_stale_temporary_files_are_removed(tmp_path):
    from qaconv.engine.checkpoint import remove_stale_temp

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1}, path)
    for name in ("checkpoint.pt.ab12.tmp", "checkpoint.pt.zz.tmp"):
        (tmp_path / name).write_bytes(b"x" * 100)  # what a kill during a checkpoint write leaves
    (tmp_path / "other.tmp").write_bytes(b"keep")
    assert [p.name for p in remove_stale_temp(path)] == ["checkpoint.pt.ab12.tmp", "checkpoint.pt.zz.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "other.tmp"]


def test_optimizer_groups_backbone_at_a_tenth_of_the_learning_rate():
    from qaconv.engine.runner import DEFAULTS, InBatchLoss, build_model
    from qaconv.engine.trainer import make_optimizer
    from qaconv.losses import TripletLoss

    cfg = {**DEFAULTS, "arch": "resnet18", "ibn": None, "pretrained": None, "height": 32, "width": 16, "neck": 8}
    model, matcher = build_model(cfg, load_weights=False)
    criterion = InBatchLoss(matcher, TripletLoss())
    opt = make_optimizer(model, criterion, lr=0.02, weight_decay=5e-4, backbone_lr_mult=0.1)
    by_id = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert by_id.pop(id(p)) == pytest.approx(0.002 if name.startswith("base.") else 0.02), name
    for p in criterion.parameters():
        assert by_id.pop(id(p)) == pytest.approx(0.02)
    assert not by_id  # every parameter in exactly one group, nothing else
    assert all(g["momentum"] == 0.9 and g["nesterov"] and g["weight_decay"] == 5e-4 for g in opt.param_groups)
