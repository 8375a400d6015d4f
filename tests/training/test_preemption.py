"""A stop signal outside training is reported as the stop it was, even where a library swallowed it."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from bam_pipeline.errors import BamError
from bam_pipeline.training import preemption
from bam_pipeline.training.job import CheckpointOnStop


@pytest.fixture
def handlers(monkeypatch):
    """preemption's handlers installed for one test, then the previous ones back."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    monkeypatch.setitem(preemption._state, "raised", None)
    monkeypatch.setitem(preemption._state, "training", False)
    preemption.install()
    yield
    for s, h in old.items():
        signal.signal(s, h)


def _signal_inside_a_bare_except(sig: int) -> BaseException:
    """What dill's ``__init__`` does when the signal lands in its first import: a bare ``except:``
    falls back to an import that fails."""
    try:
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises here
        except:  # noqa: E722
            import version_module_that_is_not_there  # noqa: F401
    except ModuleNotFoundError as e:
        return e
    raise AssertionError("the handler did not raise")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_a_library_turned_into_another_error_is_still_the_stop(handlers, sig):
    error = _signal_inside_a_bare_except(sig)
    stop = preemption.stop_behind(error)
    assert stop is not None and stop.exit_code == 128 + sig
    assert str(stop).startswith(f"stopped by {signal.Signals(sig).name};")


def test_ctrl_c_is_a_stop_not_a_keyboard_interrupt(handlers):
    with pytest.raises(preemption.Stopped) as caught:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert caught.value.exit_code == 130 and str(caught.value).startswith("stopped by SIGINT;")


def test_an_error_without_a_stop_signal_stays_unexpected(handlers):
    assert preemption.stop_behind(ValueError("a real bug")) is None


def test_a_stop_in_one_command_is_not_blamed_for_the_next_commands_error(handlers):
    """Commands run one after another in one process (a sweep, the test suite): the next one starts clean."""
    with pytest.raises(preemption.Stopped):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    preemption.install()  # what cli.main does first
    assert preemption.stop_behind(BamError("a bad input")) is None


def test_the_stop_itself_is_not_reported_twice(handlers):
    with pytest.raises(preemption.Stopped) as caught:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert preemption.stop_behind(caught.value) is None


def test_a_stop_one_of_our_handlers_turned_into_a_user_error_is_still_the_stop(handlers):
    """data/tokenizer.py's ``except Exception`` names a malformed file; a signal landing inside it is not that."""
    from bam_pipeline.errors import BamError

    try:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Exception as e:
            raise BamError(f"malformed tokenizer file: {e}") from e
    except BamError as e:
        error = e
    stop = preemption.stop_behind(error)
    assert stop is not None and stop.exit_code == 143


# ---- resuming: a checkpoint that cannot be read ------------------------------------------------
def _work(tmp_path, *names_and_contents):
    """A stage's work dir of config hash "h" with checkpoints written oldest first."""
    from bam_pipeline.store.files import write_json
    from bam_pipeline.training.job import CKPT_DIR, FINGERPRINT

    work = tmp_path / "work"
    (work / CKPT_DIR).mkdir(parents=True)
    write_json(work / FINGERPRINT, {"config_hash": "h"})
    for i, (name, write) in enumerate(names_and_contents):
        write(work / CKPT_DIR / name)
        os.utime(work / CKPT_DIR / name, ns=(10**18 + i, 10**18 + i))
    return work


def _good(path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 4}, path)


def _tampered(path):  # needs unpickling an object: never loaded
    import argparse

    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper": argparse.Namespace(x=1)}, path)


def _cut(path):
    _good(path)
    path.write_bytes(path.read_bytes()[:50])


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    from bam_pipeline.training.job import _prepare_work_dir

    work = _work(tmp_path, ("step=4.ckpt", _good), ("step=8.ckpt", _cut), ("stop-step=9.ckpt", _tampered))
    assert _prepare_work_dir(work, "h") == work / "checkpoints" / "step=4.ckpt"
    out = capsys.readouterr().out
    assert "stop-step=9.ckpt: it holds objects other than tensors" in out and "step=8.ckpt: truncated or corrupt" in out
    assert "weights_only" not in out  # torch's advice to unpickle anyway is not passed on


@pytest.mark.parametrize("bad", [_cut, _tampered])
def test_no_readable_checkpoint_is_one_line_naming_the_directory_to_delete(tmp_path, bad):
    from bam_pipeline.training.job import _prepare_work_dir

    work = _work(tmp_path, ("step=4.ckpt", bad))
    with pytest.raises(BamError, match=f"no readable checkpoint to resume from in {work} .*delete {work} to train"):
        _prepare_work_dir(work, "h")
    assert (work / "checkpoints" / "step=4.ckpt").exists()  # nothing deleted behind the user's back


def test_a_stop_never_checkpoints_weights_that_are_not_finite(tmp_path):
    """A stop signal right after an update that made a weight NaN: no stop checkpoint, so the rerun resumes from
    the last good periodic one (a stop checkpoint of finite weights is saved as before)."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    saved = []
    trainer = SimpleNamespace(global_step=7, save_checkpoint=saved.append)
    on_stop = CheckpointOnStop(tmp_path)
    on_stop.on_exception(trainer, SimpleNamespace(weights_finite=lambda: False), SIGTERMException())
    assert saved == [] and on_stop.saved_at is None
    on_stop.on_exception(trainer, SimpleNamespace(weights_finite=lambda: True), SIGTERMException())
    assert saved == [tmp_path / "stop-step=7.ckpt"] and on_stop.saved_at == 7
