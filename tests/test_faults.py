"""The fault-injection variable the failure tests use (trainer/cluster/faults.py)."""
import pytest

from trainer.cluster.faults import ENV, Fault, due, parse


def test_parse_reads_kinds_ranks_step_ranges_and_restarts():
    assert parse("crash@1:5:0, nan@*:3-8") == [Fault("crash", 1, 5, 5, 0), Fault("nan", None, 3, 8, None)]
    assert parse("") == []


@pytest.mark.parametrize("bad", ["boom@1:5", "crash@x:5", "crash@1", "nan@1:8-3", "crash 1:5"])
def test_a_value_that_does_not_parse_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match=ENV):
        parse(bad)


def test_due_matches_the_rank_the_step_and_the_slurm_restart():
    env = {ENV: "hang@1:5:0,nan@*:2-3"}
    assert due("hang", 1, 5, env) and not due("hang", 0, 5, env) and not due("hang", 1, 6, env)
    assert not due("hang", 1, 5, {**env, "SLURM_RESTART_COUNT": "1"})  # restart 0 only
    assert all(due("nan", r, s, {**env, "SLURM_RESTART_COUNT": "4"}) for r in (0, 1) for s in (2, 3))
    assert not due("crash", 0, 0, {})
