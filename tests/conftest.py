"""Shared pytest setup: quiet TensorFlow logging, make the repo root importable, end the
process without Python's teardown; the `kernel_switches` fixture; how tests compare two
computations of one training (`without_kinks`, `assert_trained_alike`)."""
import contextlib
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS)
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


# Comparing two computations of one training -------------------------------------------------------

# The optimizer of runs that `assert_trained_alike`: momentum SGD, whose update is linear in the
# gradient (see `without_kinks` for why not Adam), at a rate that moves the weights by ~1e-3 in
# the tests' few updates; at momentum's default 0.1 the kink-free conv net's loss grows tenfold.
MOMENTUM_SGD = ["--optimizer", "momentum", "--learning_rate", "0.01"]


@contextlib.contextmanager
def without_kinks():
    """Within the block, the model builders make networks without a kink: the `conv` net's
    LeakyReLU(0.2) takes slope 1 and the residual nets' ReLU is the identity (same layer names
    and weights, so checkpoints and layer lookups are unchanged).

    Why tests that compare two computations of one training use it: the gradient of ReLU or
    LeakyReLU jumps at 0. Two computations that differ by float32 rounding alone (another kernel,
    another number of devices or processes, another accumulation order, ghost batches) agree on
    each pre-activation to ~1e-6, so one that lies within that distance of 0 can fall on either
    side of the kink: its gradient takes slope 1 in one computation and 0.2 (ReLU: 0) in the
    other, an O(1) difference that reaches the bias before it at once and every earlier layer
    through the backward pass. A pass of the conv net holds hundreds of thousands of
    pre-activations of order 1, so a few passes meet such a one now and then, and whether a
    given CPU (AVX2, AVX-512: each rounds in its own order) does is luck; the weights after a
    few updates then differ by ~1e-3 in some elements, far beyond what rounding explains.
    Without the kink the network is smooth (so are the norms and the softmax loss) and the two
    computations stay within rounding of each other. Train such runs with momentum SGD
    (`MOMENTUM_SGD`) too: Adam's first updates are ~lr x sign(gradient), so a weight whose exact
    gradient is 0 (a conv bias right before BN, once the activation between them is linear)
    moves by lr x the sign of rounding noise, a full step either way. tests/test_model.py makes
    a flip on purpose and shows both. The norms that carry their own nonlinearity (FRN's TLU,
    EvoNorm-B0's max) keep their kinks: such comparisons take the other norms."""
    import keras
    import ops
    leaky_relu, activation = ops.LeakyReLU, keras.layers.Activation

    class LinearLeakyReLU(leaky_relu):
        def __init__(self, negative_slope=0.3, **kwargs):
            super().__init__(1.0, **kwargs)

    class ReLUAsIdentity(activation):
        def __init__(self, activation, **kwargs):
            super().__init__("linear" if activation == "relu" else activation, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "LeakyReLU", LinearLeakyReLU)
        patch.setattr(keras.layers, "Activation", ReLUAsIdentity)
        yield


@pytest.fixture
def kink_free_network():
    """The networks the test builds are `without_kinks()` (see there why)."""
    with without_kinks():
        yield


def without_kinks_command(cli):
    """The command running `python <cli>.py` with its networks built `without_kinks()`, for
    tests that compare runs of separate processes; the CLI's flags go after it."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {TESTS!r}); import conftest; "
                                  f"conftest.run_without_kinks({cli!r})"]


def run_without_kinks(cli):
    """`python <cli>.py`, its networks built `without_kinks()` (`without_kinks_command`)."""
    import importlib
    import util
    with without_kinks():
        util.run_cli(importlib.import_module(cli).main)


def assert_trained_alike(got, expected, start):
    """`got` and `expected`: the variables ({name: value}, or lists in one order) after the same
    updates from the same `start`, computed two ways that differ by float32 rounding alone, in a
    network `without_kinks()` trained with `MOMENTUM_SGD`.

    Each tensor may differ by 1e-4 of its own update (max |expected - start|) plus 1e-6 of the
    largest value of all the tensors. The first term is the rounding of the gradients: sums of
    thousands of float32 products, taken through up to eight layers, which agree to ~1e-5 of
    each tensor's update (measured, BN's kernels against each other, AVX-512 and AVX2). The
    second, ~8 float32 ulps (2**-23 each), is the rounding of the stored values, whatever the
    update: each update rounds a weight to an ulp of its size (gamma ~1, BN's moving variance
    a few), and a weight whose exact gradient is 0 (a conv bias right before BN) moves by lr x
    rounding noise alone. One pre-activation of conv0 on the other side of its kink moves conv0's
    bias by 6e-3 of its update, 20 times what this allows (tests/test_model.py)."""
    if not isinstance(expected, dict):
        got, expected, start = (dict(enumerate(values)) for values in (got, expected, start))
    assert got.keys() == expected.keys() == start.keys()
    floats = [name for name in expected if np.asarray(expected[name]).dtype.kind == "f"]
    largest = max(np.abs(expected[name]).max() for name in floats)
    updates = {name: np.abs(expected[name] - start[name]).max() for name in floats}
    assert max(updates.values()) > 0, "nothing was trained"
    for name in expected:
        if name not in floats:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
            continue
        difference = np.abs(got[name] - expected[name]).max()
        allowed = 1e-4 * updates[name] + 1e-6 * largest
        assert difference <= allowed, (
            f"{name}: differs by {difference:.3g}, beyond {allowed:.3g} (its update: "
            f"{updates[name]:.3g}, the largest value: {largest:.3g})")


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
