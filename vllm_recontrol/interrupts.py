"""Ctrl-C while a vLLM engine starts: make it reach the main thread.

Why: ``vllm.LLM(...)`` waits for its engine process in C calls on the main thread (zmq polls
with timeouts of minutes), and a Ctrl-C got lost there two ways, so that the command hung
until vLLM's timeout (a reviewer's run: still waiting 150 s after the signal, 3 times of 3):

- the kernel may hand the signal to another thread of the process (zmq's, torch's): that
  only sets Python's flag, which the blocked main thread never looks at;
- vLLM 0.32's ``zmq_socket_ctx`` catches KeyboardInterrupt (its handshake with the engine
  runs inside it): the start goes on to wait for an engine that the same Ctrl-C killed.

While the guard is on, after a SIGINT the main thread is sent SIGINT again (up to
``RELAY_ATTEMPTS`` times, ``RELAY_AFTER_S`` apart, while the start still runs) when Python's
handler has not run since, or when it did but the main thread sits in a zmq poll again (the
interrupt was swallowed); not while it unwinds through vLLM's own clean-up.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
from typing import Any, Iterator

RELAY_AFTER_S = 0.5
RELAY_ATTEMPTS = 10


@contextlib.contextmanager
def interrupt_reaches_main_thread() -> Iterator[None]:
    """Relay a SIGINT that stayed unhandled to the main thread, for the ``with`` body's
    duration. Nothing changes off the main thread, where SIGINT is not Python's default
    handler (the caller chose another), or where a wakeup fd is already set (an event loop
    owns the signal notifications)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    if previous_fd != -1:
        signal.set_wakeup_fd(previous_fd)
        os.close(read_fd)
        os.close(write_fd)
        yield
        return
    seen = threading.Event()  # Python's handler ran: the main thread has its interrupt
    done = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        seen.set()
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    relay = threading.Thread(target=_relay, args=(read_fd, seen, done), daemon=True,
                             name="vllm-recontrol-sigint-relay")
    relay.start()
    try:
        yield
    finally:
        done.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.set_wakeup_fd(-1)
        relay.join()
        os.close(read_fd)
        os.close(write_fd)


def _relay(read_fd: int, seen: threading.Event, done: threading.Event) -> None:
    main = threading.main_thread().ident
    while not done.is_set():  # the first SIGINT while the guard is on
        ready, _, _ = select.select([read_fd], [], [], 0.1)
        if ready and signal.SIGINT in os.read(read_fd, 512):
            break
    for _ in range(RELAY_ATTEMPTS):
        if done.wait(RELAY_AFTER_S):
            return
        if not seen.is_set() or _waiting_in_zmq_poll(main):
            seen.clear()
            signal.pthread_kill(main, signal.SIGINT)


def _waiting_in_zmq_poll(thread_id: int | None) -> bool:
    """Whether the thread's innermost Python frame is a zmq poll: a wait, not a clean-up."""
    frame = sys._current_frames().get(thread_id)
    return frame is not None and frame.f_code.co_name == "poll" and \
        f"{os.sep}zmq{os.sep}" in frame.f_code.co_filename
