"""signals_held: a stop inside the block waits for its end; a second one acts at once."""

from __future__ import annotations

import os
import signal

import pytest

from inspector.signals import signals_held


def test_a_signal_inside_the_block_takes_effect_when_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt) as e:
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")  # the block went on
    assert done == ["after the signal"] and str(e.value) == ""
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="signal SIGTERM"):
        with signals_held():
            signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))  # still the holder
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == previous  # put back


def test_a_second_signal_stops_at_once_and_a_quiet_block_raises_nothing():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("not reached")
    assert done == []
    with signals_held():
        pass
