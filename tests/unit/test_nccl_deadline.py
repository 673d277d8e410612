"""The collective weight sync's deadline where the backend does not keep it (NCCL: work.wait()
returns at once): the host polls and aborts the communicator at the deadline. A work object that
never completes stands in for a stalled GPU collective; gloo's own deadline is tested with real
processes in tests/ray/test_weight_transport.py."""

import time

import pytest

from rlhf_dist.weights.transports.collective import wait_with_deadline


class Work:
    def __init__(self, done_after_s: float):
        self.done_at = time.monotonic() + done_after_s
        self.waited = []

    def is_completed(self):
        return time.monotonic() >= self.done_at

    def wait(self, timeout=None):
        self.waited.append(timeout)


def test_a_stalled_nccl_collective_is_aborted_at_its_deadline():
    aborted = []
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="not completed within 0 s; communicator aborted"):
        wait_with_deadline(Work(done_after_s=60), 0.2, poll=True, abort=lambda: aborted.append(1))
    assert 0.2 <= time.monotonic() - start < 2 and aborted == [1]


def test_a_collective_that_completes_in_time_is_waited_for_and_not_aborted():
    work, aborted = Work(done_after_s=0.05), []
    wait_with_deadline(work, 5.0, poll=True, abort=lambda: aborted.append(1))
    assert work.waited == [None] and not aborted  # the final wait surfaces the collective's own error


def test_gloo_keeps_the_deadline_itself():
    work = Work(done_after_s=60)
    wait_with_deadline(work, 3.0, poll=False, abort=None)
    assert work.waited[0].total_seconds() == 3.0
