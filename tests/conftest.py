"""Shared pytest setup: quiet TensorFlow logging, make the repo root importable, end the
process without Python's teardown; the `kernel_switches` fixture."""
import contextlib
import os
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

_exit_status = []


@pytest.fixture
def kernel_switches():
    """`kernel_switches(cpp_kernels=False)` sets the kernel policy's switches (kernels/policy.py)
    for the layers the test constructs after it, until the test ends."""
    from kernels import policy
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(policy.using(**changes))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Exits at once with pytest's status once everything is reported. At interpreter shutdown
    TensorFlow destroys the tf.data iterators that the tests' traced training steps still hold,
    and each waits seconds for its threads: on 2 cores the suite spent minutes after its last
    test. Nothing is left to write by then."""
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])
