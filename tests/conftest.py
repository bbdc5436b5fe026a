"""Shared fixtures for the serial suite: the float64 finite-difference gradient check,
and PyTorch in float64 for the tests that compare against its autograd.

Every gradient test goes through ``numerical_gradient`` (central differences),
directly or via ``assert_layer_gradients``, so there is one reference to trust.

Every pytest process (each xdist worker, each rank of the MPI suite) gives the
processes it starts a temporary directory of their own (``TMPDIR``): ``make test``
runs several suites at once, and Open MPI's launcher keeps its session directory
and PMIx rendezvous sockets under ``TMPDIR``; two launchers sharing it now and then
failed to start ("The PMIx server's listener thread failed to start").
"""
import os
import shutil
import tempfile

import numpy as np
import pytest

from mnn.layer import LossLayer


def pytest_configure(config):
    # Short (a Unix socket's path must fit in 108 bytes) and removed at the end.
    config._mnn_tmpdir = tempfile.mkdtemp(prefix="mnn-")
    os.environ["TMPDIR"] = config._mnn_tmpdir


def pytest_unconfigure(config):
    shutil.rmtree(config._mnn_tmpdir, ignore_errors=True)


def numerical_gradient(loss, array, step=1e-6):
    r"""Central differences :math:`(\ell(a + h e_k) - \ell(a - h e_k)) / 2h` of the scalar
    ``loss()`` with respect to every entry of ``array``, which is perturbed in place
    (and restored) so that ``loss`` sees it through whatever holds it."""
    assert array.dtype == np.float64, "finite differences need float64 to be meaningful"
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + step
        above = float(loss())
        array[index] = original - step
        below = float(loss())
        array[index] = original
        gradient[index] = (above - below) / (2 * step)
    return gradient


def assert_layer_gradients(layer, inputs, targets=None, seed=0, rtol=1e-6, atol=1e-8):
    """Compare ``layer.backward`` with finite differences, for the inputs and every parameter.

    ``inputs`` is a float64 array or a tuple of them (``MatrixProduct``). A loss
    layer is differentiated as it is; any other layer through the random
    projection :math:`\\ell = \\sum R \\odot Y`, so that every output entry counts
    with its own weight.
    """
    is_loss = isinstance(layer, LossLayer)
    pair = isinstance(inputs, tuple)
    arrays = list(inputs) if pair else [inputs]
    projection = None if is_loss else np.random.default_rng(seed).standard_normal(layer.forward(inputs).shape)

    def loss():
        if is_loss:
            return layer.forward(inputs, targets)
        return np.sum(projection * layer.forward(inputs))

    loss()
    layer.zero_grads()
    input_gradients = layer.backward() if is_loss else layer.backward(projection)
    if not pair:
        input_gradients = (input_gradients,)
    for position, (array, analytic) in enumerate(zip(arrays, input_gradients)):
        assert analytic.shape == array.shape and analytic.dtype == np.float64
        np.testing.assert_allclose(analytic, numerical_gradient(loss, array), rtol=rtol, atol=atol,
                                   err_msg=f"{layer.name}: gradient of input {position}")
    for key, param in layer.params.items():
        np.testing.assert_allclose(layer.grads[key], numerical_gradient(loss, param), rtol=rtol, atol=atol,
                                   err_msg=f"{layer.name}: gradient of parameter {key}")


@pytest.fixture(name="numerical_gradient")
def numerical_gradient_fixture():
    return numerical_gradient


@pytest.fixture(name="assert_layer_gradients")
def assert_layer_gradients_fixture():
    return assert_layer_gradients


@pytest.fixture(name="torch")
def torch_fixture():
    """PyTorch, with float64 as its default dtype for the test (and float32 again after
    it, for the tests that share the process); the test skips where it is not installed."""
    torch = pytest.importorskip("torch")
    torch.set_default_dtype(torch.float64)
    yield torch
    torch.set_default_dtype(torch.float32)
