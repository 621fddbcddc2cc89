"""The command line's plumbing, shared by every script: errors a user can fix, exit codes, signals, flag checks.

- UserError and run_main: a problem the user can fix is one line on stderr and exit status 2; Ctrl-C, SIGTERM
  and SIGHUP end a script with 128 + the signal's number after its cleanup. Output to a terminal or pipe that
  is gone (a dropped ssh session), or closed from the start (`>&-`), is dropped, so that the exit status stays
  the script's own.
- check_range checks a numeric flag.
"""
import errno
import math
import os
import signal
import sys


class UserError(Exception):
    """A problem the user can fix; the scripts print it as one line, without a traceback."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a dropped ssh session) in a script that has no handler of its own: unwinds like Ctrl-C,
    so temporary files are removed."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# The signals that end a script that does not catch them itself, cleaning up first (exit 128 + the number)
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _terminate(signum, frame):
    for ending in ENDING_SIGNALS:  # a repeated signal must not interrupt the cleanup
        signal.signal(ending, signal.SIG_IGN)
    raise Terminated(signum)


class SurvivingStream:
    """A text stream (sys.stdout, sys.stderr) whose writes survive the end of what it writes to: a terminal
    that is gone (EIO: the ssh session dropped) or a pipe closed at the other end (EPIPE). From then on its
    file descriptor points at /dev/null, so that what is still buffered, later writes and the flush at exit
    all succeed and the script ends with its own exit status, not a traceback."""

    GONE = {errno.EIO, errno.EPIPE}

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            self._discard(e)
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            self._discard(e)

    def _discard(self, error):
        if error.errno not in self.GONE:
            raise error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        try:
            self._stream.flush()  # what it still holds, into /dev/null
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _surviving(stream):
    """stream wrapped in SurvivingStream when it has a file descriptor (not a caller's StringIO)."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream
    return SurvivingStream(stream)


def _dropping(fd):
    """A text stream into /dev/null for a standard stream the script was started without (`>&-`: Python makes
    it None), on the stream's own file descriptor while that is free: a file the script opens would take it
    otherwise, and what a library writes to the descriptor (a C++ warning, a crash message) would land there."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.fstat(fd)
    except OSError:  # closed: /dev/null takes its place
        os.dup2(devnull, fd)
        os.close(devnull)
        devnull = fd
    return open(devnull, "w", buffering=1)


def run_main(main):
    """Run main() with one-line output for what the user can fix: a UserError is `error: ...` and exit 2, a
    second Ctrl-C (the first asks the trainers to save and stop) is `interrupted` and exit 130, and SIGTERM or
    SIGHUP, where the script does not catch it itself (the trainers do) and it is not ignored (nohup), ends it
    the same way with exit 143 or 129. Output survives a closed terminal or pipe (SurvivingStream), and a
    stream closed from the start (`>&-`, `2>&-`) is dropped."""
    if sys.stdout is None:
        sys.stdout = _dropping(1)
    if sys.stderr is None:
        sys.stderr = _dropping(2)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _surviving(sys.stdout), _surviving(sys.stderr)
    # A batch job's stdout is a file, which Python would block-buffer: its log would stay empty while the job runs.
    if hasattr(streams[0], "reconfigure"):  # not when a caller has put a StringIO there
        try:
            streams[0].reconfigure(line_buffering=True)
        except OSError:  # it flushes first, and the terminal may be gone already: SurvivingStream handles that
            sys.stdout.flush()
    previous = {signum: signal.getsignal(signum) for signum in ENDING_SIGNALS}
    for signum, handler in previous.items():
        if handler == signal.SIG_DFL:
            signal.signal(signum, _terminate)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated as e:
        print(f"stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
        sys.exit(128 + e.signum)
    finally:
        sys.stdout.flush()
        sys.stdout, sys.stderr = streams
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_range(args, name, low, high=math.inf, low_open=False):
    """--name must lie in [low, high] ((low, high] with low_open); None (a flag not given) passes."""
    value = getattr(args, name)
    if value is None:
        return
    if not ((value > low if low_open else value >= low) and value <= high):  # NaN fails both
        if high == math.inf:
            bounds = f"{'above' if low_open else 'at least'} {low:g}"
        else:
            bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise UserError(f"--{name.replace('_', '-')} must be {bounds}, got {value:g}")
