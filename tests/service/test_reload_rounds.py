"""reload_status.Rounds (sans-IO): the outcomes of one signalled reload, one per worker, make
one outcome; a worker that dies or stays silent does not hold the count back or double it."""

from __future__ import annotations

from l4lb.balancer.reload_status import Outcome, Rounds, Tally

OK = Outcome(True, (), "listeners=web pools=web")
NO = Outcome(False, ("listener more: cannot bind",))


def test_a_round_completes_when_every_worker_answered() -> None:
    rounds = Rounds()
    rounds.open({0, 1}, now=0.0)
    rounds.outcome(1, OK)
    assert rounds.settle(now=1.0) == []  # worker 0 has not answered yet
    rounds.outcome(0, OK)
    assert rounds.settle(now=1.0) == [OK]
    assert rounds.settle(now=99.0) == []  # counted once


def test_one_refusing_worker_makes_the_reload_refused() -> None:
    rounds = Rounds()
    rounds.open({0, 1}, now=0.0)
    rounds.outcome(0, OK)
    rounds.outcome(1, NO)
    (done,) = rounds.settle(now=0.5)
    assert not done.applied
    assert done.errors == ("worker 1: listener more: cannot bind",)
    assert done.summary == OK.summary


def test_two_reloads_in_a_row_pair_by_order() -> None:
    rounds = Rounds()
    rounds.open({0, 1}, now=0.0)
    rounds.open({0, 1}, now=0.1)
    rounds.outcome(0, OK)
    rounds.outcome(0, NO)  # worker 0's second reload: the second round
    rounds.outcome(1, OK)
    assert rounds.settle(now=0.2) == [OK]
    rounds.outcome(1, NO)
    (second,) = rounds.settle(now=0.3)
    assert second.errors == (
        "worker 0: listener more: cannot bind",
        "worker 1: listener more: cannot bind",
    )


def test_a_dead_worker_is_not_waited_for_and_a_silent_one_only_until_the_deadline() -> None:
    rounds = Rounds()
    rounds.open({0, 1}, now=0.0)
    rounds.outcome(0, OK)
    rounds.gone(1)
    assert rounds.settle(now=0.1) == [OK]
    rounds.open({0, 1}, now=1.0)
    rounds.outcome(1, OK)
    assert rounds.settle(now=1.0 + Rounds.WAIT - 0.1) == []
    assert rounds.next_deadline() == 1.0 + Rounds.WAIT
    (late,) = rounds.settle(now=1.0 + Rounds.WAIT)
    assert late.errors == (f"worker 0: no outcome within {Rounds.WAIT:g}s",)


def test_a_worker_catching_up_after_its_start_is_not_a_reload() -> None:
    rounds = Rounds()
    rounds.outcome(2, OK)  # no round waits for worker 2 (started after the SIGHUP)
    assert rounds.settle(now=50.0) == []


def test_the_tally_counts_and_round_trips() -> None:
    tally = Tally().add(True).add(False, ["bad"]).add(True)
    assert (tally.applied, tally.refused) == (2, 1)
    assert tally.last is not None and tally.last["ok"] is True
    again = Tally.decode(tally.encode())
    assert (again.applied, again.refused, again.last) == (2, 1, tally.last)
