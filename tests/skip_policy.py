"""A pytest plugin (registered by tests/conftest.py): under CI, a skipped test fails the run.

"CI green" must mean that the real layers ran: DALI, the SLURM cluster, W&B, ONNX. Under CI
(``CI=true``, as .ci/run runs), any test outside ``-m gpu`` that is skipped fails the run, unless
``tests/allowed_skips.txt`` lists it, with the reason. Elsewhere (a user's ``make test`` without
root, say) skips are allowed, and the last lines of the run say which layers were skipped and why.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ALLOWED = Path(__file__).with_name("allowed_skips.txt")


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def allowed_skips(path: Path = ALLOWED) -> dict[str, str]:
    """``{node id prefix: reason}`` from the allow-list: one ``PREFIX  # REASON`` a line."""
    entries = {}
    if not path.is_file():
        return entries
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prefix, _, reason = line.partition("#")
        if not reason.strip():
            raise pytest.UsageError(f"{path}:{n}: an allowed skip needs a reason after '#': {line!r}")
        entries[prefix.strip()] = reason.strip()
    return entries


class SkipPolicy:
    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []  # (node id, reason) outside -m gpu
        self.unexpected: list[tuple[str, str]] = []

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail") or "gpu" in report.keywords:
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        self.skipped.append((report.nodeid, reason.removeprefix("Skipped: ")))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not under_ci():
            return
        allowed = allowed_skips()
        self.unexpected = [(n, r) for n, r in self.skipped if not any(n.startswith(p) for p in allowed)]
        if self.unexpected and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """After pytest's own summary: the run's last lines."""
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or not self.skipped:
            return
        write = reporter.write_line
        if under_ci() and self.unexpected:
            write(f"CI=true: {len(self.unexpected)} test(s) skipped outside -m gpu and not in "
                  f"tests/allowed_skips.txt, so this run FAILS (the real layers must run under CI):", red=True)
            for nodeid, reason in self.unexpected:
                write(f"  {nodeid}: {reason}", red=True)
            return
        layers: dict[str, int] = {}
        for nodeid, reason in self.skipped:
            key = "the SLURM layer (tests/slurm)" if nodeid.startswith("tests/slurm/") else reason
            layers[key] = layers.get(key, 0) + 1
        write(f"{len(self.skipped)} test(s) skipped outside -m gpu (allowed here; under CI=true they fail the run):",
              yellow=True)
        for what, count in layers.items():
            if what.startswith("the SLURM layer"):
                reasons = sorted({r for n, r in self.skipped if n.startswith("tests/slurm/")})
                what = f"{what}: {'; '.join(reasons)}"
            write(f"  {count} x {what}", yellow=True)


def pytest_configure(config: pytest.Config) -> None:
    """For ``pytest -p tests.skip_policy`` (tests/test_skip_policy.py); tests/conftest.py registers
    the policy itself."""
    if not config.pluginmanager.has_plugin("imagenet_trainer_skip_policy"):
        config.pluginmanager.register(SkipPolicy(), "imagenet_trainer_skip_policy")
