"""prepack=auto: each layer timed plain and packed on its first input, the faster kept, the
choice cached per machine (CPU model, ISA, PyTorch version, threads) and per layer and input
shape; a corrupt cache ignored and rewritten; outputs those of the plain weights."""

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from torch import nn

from model.weights import calibration as calib
from model.weights import prepack
from model.weights.calibration import Calibration, cache_path, read_cache
from model.weights.prepack import prepacked_weights

pytestmark = pytest.mark.skipif(not prepack.available(), reason="PyTorch built without oneDNN")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 8, 1), nn.Flatten(2),
        nn.Linear(36, 12),
    ).eval()  # fmt: skip


def run(net, calibration, shape=(2, 4, 6, 6)):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), prepacked_weights(net, calibration) as count:
        first, second = net(x), net(x)  # the first call calibrates, the second uses the choice
    return count, first, second


class FakeClock:
    """A clock that only the candidates move: 1 s per call of ``slow``, 0.1 s of the other."""

    def __init__(self, monkeypatch, slow: str) -> None:
        self.now = 0.0
        for candidate in ("plain", "packed"):
            method = getattr(prepack._Packing, f"run_{candidate}")
            monkeypatch.setattr(
                prepack._Packing, f"run_{candidate}", self.timed(method, candidate == slow)
            )

    def timed(self, method, slow: bool):
        def run(packing, x):
            self.now += 1.0 if slow else 0.1
            return method(packing, x)

        return run

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("slow", ["plain", "packed"])
def test_auto_keeps_the_faster_candidate_and_matches_plain(slow, tmp_path, monkeypatch):
    net = small_net()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(x)
    lines = []
    clock = FakeClock(monkeypatch, slow)
    cal = Calibration("net", root=tmp_path, clock=clock, log=lines.append)
    count, first, second = run(net, cal)
    assert count == 3  # both convolutions (1x1 too) and the linear layer
    choices = read_cache(cal.path, calib.machine())
    assert len(choices) == 3
    assert all(c["packed"] == (slow == "plain") for c in choices.values())
    assert all(c[f"{slow}_s"] == 1.0 for c in choices.values())
    for out in (first, second):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    packed, plain_s = (3, 3.0) if slow == "plain" else (0, 0.3)
    assert lines == [
        f"prepack=auto: net: {packed} of 3 layers packed; 3 timed on their first input "
        f"(+3.00 s; those {plain_s:.3f} s plain -> 0.300 s) ({cal.path})"
    ]
    assert all(p.numel() > 0 for p in net.parameters())  # plain weights back


def test_cache_is_reused_and_keyed_by_machine_and_input_shape(tmp_path, monkeypatch):
    lines = []
    cal = Calibration("net", root=tmp_path, log=lines.append)
    run(small_net(), cal)
    saved = json.loads(cal.path.read_text())
    assert saved["machine"] == calib.machine() == cal.machine
    assert set(saved["machine"]) == {"cpu", "isa", "torch", "threads"}
    assert any(key.startswith("conv2d 16x4x3x3 s[1, 1] p[1, 1]") for key in saved["layers"])
    assert all(key.endswith(("on 2x4x6x6", "on 2x16x6x6", "on 2x8x36")) for key in saved["layers"])

    def never_timed(self, x):
        raise AssertionError("a cached layer was timed again")

    with monkeypatch.context() as patch:
        patch.setattr(prepack._Packing, "calibrate", never_timed)
        again = Calibration("net", root=tmp_path, log=lines.append)
        run(small_net(), again)  # same machine, same shapes: all from the cache
    assert lines[-1].startswith("prepack=auto: net:") and "3 as cached" in lines[-1]

    other_shape = Calibration("net", root=tmp_path, log=lines.append)
    run(small_net(), other_shape, shape=(1, 4, 6, 6))
    assert "3 timed" in lines[-1]
    assert len(read_cache(cal.path, cal.machine)) == 6  # both shapes kept

    threads = {**calib.machine(), "threads": calib.machine()["threads"] + 1}
    monkeypatch.setattr(calib, "machine", lambda: threads)
    elsewhere = Calibration("net", root=tmp_path, log=lines.append)
    assert elsewhere.path != cal.path and elsewhere.choices == {}
    assert read_cache(cal.path, threads) == {}  # a file of another machine is not read


def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path):
    path = cache_path(calib.machine(), tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"version": 1, "machine": ')  # cut short
    cal = Calibration("net", root=tmp_path, log=lambda line: None)
    assert cal.choices == {}
    run(small_net(), cal)
    assert len(read_cache(path, calib.machine())) == 3
    path.write_text(json.dumps({"version": 1, "machine": calib.machine(), "layers": [1, 2]}))
    assert read_cache(path, calib.machine()) == {}


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("GEN1_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calib.cache_dir() == tmp_path / "gen1"
    assert cache_path().parent == tmp_path / "gen1" / "prepack"
    monkeypatch.setenv("GEN1_CACHE_DIR", str(tmp_path / "mine"))
    assert calib.cache_dir() == tmp_path / "mine"


def test_a_layer_is_packed_for_its_input_shape_and_repacked_for_a_new_one():
    conv = small_net()[0]
    shapes = []
    pack = prepack._Packing.pack

    def recording(self, shape):
        shapes.append(shape)
        pack(self, shape)

    small, large = torch.randn(1, 4, 6, 6), torch.randn(3, 4, 10, 10)
    with torch.no_grad():
        expected = conv(small), conv(large)
        with pytest.MonkeyPatch.context() as patch, prepacked_weights(conv) as count:
            patch.setattr(prepack._Packing, "pack", recording)
            got = conv(small), conv(small), conv(large), conv(small)
    assert count == 1
    assert shapes == [(1, 4, 6, 6), (3, 4, 10, 10), (1, 4, 6, 6)]
    for out, ref in zip(got, [expected[0], *expected, expected[0]], strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _write_many(root: str, prefix: str, count: int) -> None:
    calibration = Calibration("UNet", root=Path(root), log=lambda line: None)
    for i in range(count):
        calibration.record(f"{prefix} {i}", 1.0, 2.0, 3.0)
        calibration.write()
        calibration.new = {}


def test_processes_writing_the_cache_at_once_lose_no_choice(tmp_path):
    """Two processes calibrating at the same time: every choice of both ends in the file
    (the merge is under a lock; without it, one process's write drops the other's)."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_many, args=(str(tmp_path), name, 60)) for name in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    calibration = Calibration("UNet", root=tmp_path, log=lambda line: None)
    assert {f"{p} {i}" for p in "ab" for i in range(60)} <= set(calibration.choices)


def test_a_layer_meeting_a_second_shape_is_keyed_by_its_real_weight(tmp_path, monkeypatch):
    """Packed for one input shape, a layer holds only its packed weight; its next shape (a
    temporal window, a multi-frame canvas) is still looked up by the plain weight's shape, so
    a later run finds both shapes in the cache instead of timing the second again."""
    conv = nn.Conv2d(4, 16, 3, padding=1).eval()
    clock = FakeClock(monkeypatch, slow="plain")  # packing wins: the plain weight is dropped

    def two_shapes(calibration):
        with torch.no_grad(), prepacked_weights(conv, calibration):
            conv(torch.randn(1, 4, 6, 6))
            conv(torch.randn(1, 4, 10, 10))

    first = Calibration("net", root=tmp_path, clock=clock, log=lambda line: None)
    two_shapes(first)
    keys = set(read_cache(first.path, first.machine))
    assert keys == {f"conv2d 16x4x3x3 s[1, 1] p[1, 1] d[1, 1] g1 on 1x4x{n}x{n}" for n in (6, 10)}

    def never_timed(self, x):
        raise AssertionError("a cached layer was timed again")

    monkeypatch.setattr(prepack._Packing, "calibrate", never_timed)
    two_shapes(Calibration("net", root=tmp_path, clock=clock, log=lambda line: None))
