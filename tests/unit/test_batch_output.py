"""`enhance-worker batch`'s progress bar and summary, drawn into a stand-in terminal."""

from __future__ import annotations

import io
import time

from workers.batch import Progress, reason_of


class Terminal(io.StringIO):
    """Text written to a terminal, with `\\r` returning to the line's start as a terminal does."""

    def isatty(self) -> bool:
        return True

    def screen(self) -> list[str]:
        lines: list[list[str]] = [[]]
        column = 0
        for char in self.getvalue():
            if char == "\r":
                column = 0
            elif char == "\n":
                lines.append([])
                column = 0
            else:
                line = lines[-1]
                if column < len(line):
                    line[column] = char
                else:
                    line.append(char)
                column += 1
        return ["".join(line).rstrip() for line in lines]


def test_a_shorter_redraw_leaves_nothing_of_the_longer_one() -> None:
    terminal = Terminal()
    progress = Progress(total=100, stream=terminal, started=time.monotonic() - 10)
    progress.done, progress.failed, progress.cost_micro = 50, 12, 123_456_789
    progress.draw(force=True)
    progress.done, progress.failed, progress.cost_micro = 51, 0, 6_500
    progress.draw(force=True)
    (line,) = terminal.screen()
    assert line.endswith("failed 0 cost $0.006500"), line


def test_a_line_of_its_own_under_the_bar() -> None:
    terminal = Terminal()
    progress = Progress(total=3, stream=terminal)
    progress.draw(force=True)
    progress.say("No worker is running")
    assert terminal.screen()[1] == "No worker is running"
    assert terminal.screen()[2].startswith("[----")


def test_reasons_group_without_their_task_uuids() -> None:
    one = "PermanentError: Runware promptEnhance 1b4e28ba-2fa1-41d2-883f-0016d3cca427: HTTP 400"
    two = "PermanentError: Runware promptEnhance 6fa459ea-ee8a-4ca4-894e-db77e160355e: HTTP 400"
    assert reason_of(one) == reason_of(two) == "PermanentError: Runware promptEnhance …: HTTP 400"
