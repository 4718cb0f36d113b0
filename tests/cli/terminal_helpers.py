"""A program run the way a user runs it in a terminal: on a pseudo-terminal that is its controlling terminal
(so a typed Ctrl-C reaches it as SIGINT), optionally with stdout sent to a pipe (`prog > file` in a terminal)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def in_terminal_session() -> None:
    """``preexec_fn`` of a program run on a pty: the pty becomes its controlling terminal, and Ctrl-C its SIGINT with
    the default action (a job a non-interactive shell starts in the background inherits SIGINT ignored, which a
    program a user runs in the foreground of a terminal never has)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """``argv`` on a pseudo-terminal; ``stdout_pipe``: its stdout goes to a pipe (read with :meth:`stdout`)."""

    def __init__(self, argv: list[str], env: dict[str, str], *, stdout_pipe: bool = False):
        self.fd, child = pty.openpty()
        attrs = termios.tcgetattr(child)  # no echo: a typed Ctrl-C would show as "^C" inside the program's text
        attrs[3] &= ~(termios.ECHO | termios.ECHOCTL)
        termios.tcsetattr(child, termios.TCSANOW, attrs)
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a pty starts 0 columns wide
        self.proc = subprocess.Popen(
            argv,
            stdin=child,
            stdout=subprocess.PIPE if stdout_pipe else child,
            stderr=child,
            env=env,
            close_fds=True,
            start_new_session=True,
            preexec_fn=in_terminal_session,
        )
        os.close(child)
        self.seen = ""  # what the terminal showed, escape sequences and carriage returns removed

    def _read(self, wait: float) -> bool:
        if not select.select([self.fd], [], [], wait)[0]:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the program closed the terminal
            return False
        self.seen += ANSI.sub("", data.decode(errors="replace"))
        return bool(data)

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        """Wait until the terminal shows ``pattern``; the match (what it showed stays in :attr:`seen`)."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.seen)):
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.seen}"
            if not self._read(0.2) and not re.search(pattern, self.seen):
                raise AssertionError(f"the program closed the terminal without {pattern!r}:\n{self.seen}")
        return match

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")

    def finish(self, timeout: float = 120) -> int:
        """Wait for the program to exit (reading what it still shows); its exit status."""
        code = self.proc.wait(timeout=timeout)
        while self._read(0.1) and select.select([self.fd], [], [], 0)[0]:
            pass
        return code

    def stdout(self) -> str:
        return self.proc.stdout.read().decode() if self.proc.stdout else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)
