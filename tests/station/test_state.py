import pytest

from station.state import IllegalTransition, LineState, StateMachine


def test_normal_cycle():
    sm = StateMachine()
    sm.start(); assert sm.state == LineState.RUNNING
    sm.pause(); assert sm.state == LineState.PAUSED
    sm.start(); sm.stop(); assert sm.state == LineState.IDLE


def test_fault_needs_an_explicit_reset():
    sm = StateMachine()
    sm.start()
    sm.fault("camera lost")
    with pytest.raises(IllegalTransition, match="reset"):
        sm.start()
    sm.reset()
    sm.start()
    assert sm.state == LineState.RUNNING


def test_estop_from_anywhere():
    sm = StateMachine()
    sm.estop()
    assert sm.state == LineState.ESTOP
    with pytest.raises(IllegalTransition):
        sm.pause()
