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


def test_mcu_estop_puts_the_line_in_estop_and_the_operator_reset_rearms_it(tmp_path):
    """A Fault(ESTOP) from the diverter MCU takes the line to e-stop; leaving it takes the operator's reset,
    which is the MCU's explicit re-arm (refused while the e-stop input is still pressed)."""
    import time

    from firmware_bridge import ConstantSpeedEnvironment, DiverterLink, DiverterSetup, FirmwareSimulator
    from station.alarms import AlarmBoard
    from station.runtime import Station

    sim = FirmwareSimulator.on_new_pty(ConstantSpeedEnvironment(mm_per_count=0.1, speed_mm_s=200.0))
    with sim, DiverterLink(sim.slave_path) as link:
        link.configure(0.1, [DiverterSetup(0, 0, 100)])
        st = Station.__new__(Station)  # only the line-state part of a station: no camera, model or records
        st.state, st.link, st.alarms = StateMachine(), link, AlarmBoard(time.monotonic)
        st.start_line()
        sim.set_estop(True)
        deadline = time.monotonic() + 2.0
        while not link.estop_latched:
            assert time.monotonic() < deadline, "the MCU's Fault(ESTOP) never reached the link"
            time.sleep(0.01)
        st._follow_mcu_estop()
        assert st.state.state == LineState.ESTOP and "diverter controller" in st.state.reason
        with pytest.raises(IllegalTransition, match="reset"):
            st.start_line()
        with pytest.raises(IllegalTransition, match="still pressed"):
            st.reset_line()
        assert st.state.state == LineState.ESTOP
        sim.set_estop(False)
        assert sim.sync()
        st._follow_mcu_estop()
        assert st.state.state == LineState.ESTOP  # releasing the button does not leave the e-stop
        assert not sim.armed
        st.reset_line()
        assert st.state.state == LineState.IDLE and sim.armed and not link.estop_latched
        st._follow_mcu_estop()
        st.start_line()
        assert st.state.state == LineState.RUNNING
        # the HMI's software e-stop disarms the MCU too (what it has queued must not fire); the reset re-arms
        link.fire_at(1, 0, belt_count=10**9, pulse_ms=10)
        assert link.wait_settled(1.0) and sim.queue_depth == 1
        st.estop_line()
        assert st.state.state == LineState.ESTOP and not sim.armed and sim.queue_depth == 0
        st.reset_line()
        assert st.state.state == LineState.IDLE and sim.armed


def test_the_operator_sees_the_diverter_link_go_and_come_back():
    """A lost port is a FAULT alarm; its recovery (the link re-opened it by itself) an INFO alarm, with
    parameters for the page's template, so the operator knows the line can sort again."""
    from firmware_bridge import LinkErrorEvent, LinkRestoredEvent
    from station.alarms import AlarmBoard, Severity
    from station.core import StationCore

    class Link:
        events = [LinkErrorEvent(1.0, "read failed: [Errno 5] Input/output error", (7,), True),
                  LinkRestoredEvent(1.5, 1, 0x1234, False, 0.52)]

        def poll_events(self):
            out, self.events = self.events, []
            return out

    core = StationCore.__new__(StationCore)  # only the link-event part of the core
    core.link, core.clock, core.alarms = Link(), (lambda: 2.0), AlarmBoard(lambda: 2.0)
    assert core.handle_link_events() == 2
    by_code = {a.code: a for a in core.alarms.active()}
    assert by_code["link_lost"].severity == Severity.FAULT
    restored = by_code["link_restored"]
    assert restored.severity == Severity.INFO and restored.detail == "link_restored"
    assert restored.params == {"down_s": "0.5", "reconnects": 1}
