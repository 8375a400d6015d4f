"""A stop signal outside training is reported as the stop it was, even where a library swallowed it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from bam_pipeline.training import preemption


@pytest.fixture
def handlers(monkeypatch):
    """preemption's handlers installed for one test, then the previous ones back."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_a_library_turned_into_another_error_is_still_the_stop(handlers, sig):
    error = _signal_inside_a_bare_except(sig)
    stop = preemption.stop_behind(error)
    assert stop is not None and stop.exit_code == 128 + sig
    assert str(stop).startswith(f"stopped by {signal.Signals(sig).name};")


def test_an_error_without_a_stop_signal_stays_unexpected(handlers):
    assert preemption.stop_behind(ValueError("a real bug")) is None


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
