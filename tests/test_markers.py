"""The fast tier stays fast: a test that trains in a subprocess or runs several processes is marked slow.

``pytest -m "not slow"`` is the tier a developer runs between commits (``make test-fast``); ``make
test`` (CI) runs everything. This rule is about what a test *does*, read from its source, the
sources of the fixtures it uses and of the helpers under tests/ that those call; it never times
anything. Tests that are slow for other reasons (a long in-process fit, a big DALI pipeline) are
listed by the timing line at the end of every run (tests/conftest.py), not failed here: timings
on a shared machine are no rule.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# What makes a test slow whatever the machine: a `fit` of the CLI in a subprocess, or more than one
# process of a job (DDP ranks: Lightning's devices=2, mp.spawn, or a process started per rank).
SLOW_WORK = {
    "a CLI fit in a subprocess": re.compile(r'run_cli\(\s*"fit"|"-m",\s*"trainer",\s*"fit"'),
    "DDP over two processes": re.compile(r"devices=2"),
    "processes started as ranks": re.compile(
        r"mp\.spawn\(|(Popen|\.Process)\(.{0,400}?\bfor\s+(rank|r)\s+in\b|\bfor\s+(rank|r)\s+in\b.{0,400}?(Popen|\.Process)\(",
        re.S),
}


def _code_sources(func, seen: set) -> list[str]:
    """The source of ``func`` and of every function under tests/ that it names, recursively."""
    func = inspect.unwrap(func)
    code = getattr(func, "__code__", None)
    if code is None or func in seen or not Path(code.co_filename).resolve().is_relative_to(TESTS):
        return []
    seen.add(func)
    try:
        sources = [inspect.getsource(func)]
    except (OSError, TypeError):
        return []
    codes, names = [code], set()
    while codes:
        c = codes.pop()
        names.update(c.co_names)
        codes.extend(const for const in c.co_consts if inspect.iscode(const))
    for name in sorted(names):
        sources += _code_sources(func.__globals__.get(name), seen)
    return sources


def _slow_work_in(sources: list[str]) -> list[str]:
    return [what for what, pattern in SLOW_WORK.items() if any(pattern.search(source) for source in sources)]


def _what_makes_it_slow(item: pytest.Item) -> list[str]:
    """The slow work in the test, in every fixture it uses (the whole closure) and in their helpers."""
    seen: set = set()
    sources = _code_sources(getattr(item, "function", None), seen)
    for defs in item._fixtureinfo.name2fixturedefs.values():
        sources += _code_sources(defs[-1].func, seen)
    return _slow_work_in(sources)


def test_tests_that_train_in_a_subprocess_or_run_several_processes_are_marked_slow(request):
    # The items of this run: under -m "not slow" the slow ones are deselected, and what is left
    # must hold none of that work; in a full run, every item without the marker is checked.
    unmarked = [item for item in request.session.items if item.get_closest_marker("slow") is None]
    offenders = {}
    for item in unmarked:
        if Path(str(item.path)).resolve().is_relative_to(TESTS / "slurm"):
            offenders[item.nodeid] = ["the SLURM cluster (tests/slurm)"]
        elif what := _what_makes_it_slow(item):
            offenders[item.nodeid] = what
    assert not offenders, "mark these @pytest.mark.slow (the fast tier is `pytest -m \"not slow\"`):\n" + "\n".join(
        f"  {nodeid}: {', '.join(what)}" for nodeid, what in offenders.items())


def test_the_rule_reads_tests_fixtures_and_helpers():
    """It finds the work where it is: in the test, in a module fixture that trains through the CLI,
    in a helper that starts the ranks; and an in-process fit in one process is not slow by rule."""
    import test_export
    import test_fit
    import test_preemption
    from tests.conftest import fit_until_interrupted

    def found(func) -> list[str]:
        return _slow_work_in(_code_sources(func, set()))

    assert found(test_fit.test_fit_again_resumes_from_last_ckpt_and_continues_global_step) == [
        "a CLI fit in a subprocess"]
    assert found(test_export.trained) == ["a CLI fit in a subprocess"]
    assert found(test_preemption.test_sigterm_to_one_rank_checkpoints_on_both_without_a_requeue_and_resumes_exactly) == [
        "processes started as ranks"]  # through its helper _run_ranks
    assert found(fit_until_interrupted) == []


def test_the_slow_marker_is_registered(pytestconfig):
    assert any(line.startswith("slow:") for line in pytestconfig.getini("markers"))
