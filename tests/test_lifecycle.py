import pytest
from fireclaw.pool.lifecycle import TRANSITIONS, Event, IllegalTransition, Lifecycle, State


def test_happy_path_through_the_table() -> None:
    lc = Lifecycle(0.0)
    for event, state in [
        (Event.READY, State.IDLE),
        (Event.PROMOTE, State.PROMOTING),
        (Event.PROMOTED, State.ACTIVE),
        (Event.STOP, State.DRAINING),
        (Event.EXIT, State.STOPPED),
    ]:
        assert lc.fire(event, 1.0) is state


def test_crash_backoff_restart_and_failure() -> None:
    lc = Lifecycle(0.0, State.IDLE)
    assert lc.fire(Event.CRASH, 1.0) is State.CRASHED
    assert lc.fire(Event.RETRY, 2.0) is State.BACKOFF
    assert lc.fire(Event.RESTART, 3.0) is State.RESTORING
    lc.fire(Event.CRASH, 4.0)
    assert lc.fire(Event.GIVE_UP, 5.0) is State.FAILED
    assert lc.since == 5.0
    assert lc.fire(Event.RESET, 6.0) is State.RESTORING


def test_illegal_moves_raise_and_leave_the_state_alone() -> None:
    lc = Lifecycle(0.0)
    with pytest.raises(IllegalTransition, match="claim is not allowed in state restoring"):
        lc.fire(Event.CLAIM, 1.0)
    assert lc.state is State.RESTORING
    assert not Lifecycle(0.0, State.STOPPED).can(Event.RESTART)


def test_every_state_has_a_row_and_only_stopped_is_terminal() -> None:
    assert set(TRANSITIONS) == set(State)
    assert [s for s, row in TRANSITIONS.items() if not row] == [State.STOPPED]
