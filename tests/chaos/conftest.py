"""Print the fault figures of the run at its end, whatever pytest captured."""

from __future__ import annotations

import pytest

from tests.chaos import figures


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if figures.collected:
        terminalreporter.section("fault figures")
        terminalreporter.write_line(figures.table(figures.collected))
        terminalreporter.write_line(f"(also appended to {figures.results_file()})")
