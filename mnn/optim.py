r"""Optimizers that update a net's parameters from its accumulated gradients.

An optimizer works on anything with ``named_params()`` (a ``SequentialLayers``)
and looks the arrays up at every step, so gradients may be moved into other
buffers after the optimizer was made. Its state is a dict of arrays, saved and
loaded without pickle::

    opt = SGD(net, lr=0.1, momentum=0.9)
    net(x, labels); net.backward(); opt.step(); opt.zero_grads()
    np.savez("opt.npz", **opt.state_dict())
"""

import numpy as np

__all__ = ["Optimizer", "SGD", "Adam"]


class Optimizer:
    """Common parts: the net, the learning rate ``lr`` and the state arrays."""

    # The kinds of state a subclass keeps: the part of a state key before the
    # first dot ("momentum.0.LinearLayer.w"), or the whole key for scalars ("step").
    _state_kinds = ()

    def __init__(self, net, lr):
        if not hasattr(net, "named_params"):
            raise TypeError(f"{type(self).__name__}: expected a net with named_params(), got {type(net).__name__}")
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: expected lr > 0, got {lr}")
        self.net = net
        self.lr = float(lr)
        self.state = {}

    def step(self):
        raise NotImplementedError

    def zero_grads(self):
        self.net.zero_grads()

    def _buffer(self, kind, name, like):
        """The state array ``kind.name``: zeros like ``like`` on first use, and
        cast to ``like``'s dtype if the net was cast since (``net.astype``)."""
        key = f"{kind}.{name}"
        if key not in self.state:
            self.state[key] = np.zeros_like(like)
        elif self.state[key].dtype != like.dtype:
            self.state[key] = self.state[key].astype(like.dtype)
        return self.state[key]

    def state_dict(self):
        return {key: np.array(value, copy=True) for key, value in self.state.items()}

    def load_state_dict(self, state):
        """Replace the state by copies of ``state``, checking names and shapes."""
        params = {name: param for name, param, _ in self.net.named_params()}
        # Scalars such as Adam's step count exist from the start; without them
        # the state came from another optimizer or was cut short.
        for key in self.state:
            if "." not in key and key not in state:
                raise ValueError(f"{type(self).__name__}.load_state_dict: missing key {key!r}")
        loaded = {}
        for key, value in state.items():
            value = np.asarray(value)
            kind, _, name = key.partition(".")
            if kind not in self._state_kinds:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: unexpected key {key!r}, expected keys "
                    f"starting with one of {list(self._state_kinds)} (state of another optimizer?)")
            if name:
                if name not in params:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {key} names no parameter of the net")
                if value.shape != params[name].shape:
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: {key} expected shape "
                        f"{params[name].shape}, got {value.shape}")
                # Cast from the other float type only: int8 or bool state is no run's.
                if value.dtype.kind != "f":
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {key}: expected floating-point "
                                     f"values, got {value.dtype}")
                value = value.astype(params[name].dtype)
            elif value.shape != () or value.dtype.kind not in "iu" or value < 0:
                # The scalars are counts (Adam's step): a negative or fractional one is damage.
                raise ValueError(f"{type(self).__name__}.load_state_dict: {key}: expected a count of steps "
                                 f"(an integer scalar >= 0), got {value if value.size < 4 else value.shape}")
            loaded[key] = value.copy()
        self.state = loaded


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, Nesterov and weight decay.

    With :math:`g_t = \nabla_\theta \ell + \lambda \theta_{t-1}` (weight decay
    :math:`\lambda`) and momentum :math:`\mu`, as in PyTorch:

    .. math::
        v_t = \mu v_{t-1} + g_t, \qquad
        \theta_t = \theta_{t-1} - \eta \begin{cases} g_t + \mu v_t & \text{Nesterov} \\
        v_t & \text{otherwise.} \end{cases} \tag{1}

    With :math:`\mu = 0` this is :math:`\theta_t = \theta_{t-1} - \eta g_t`.
    """

    _state_kinds = ("momentum",)

    def __init__(self, net, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(net, lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"SGD: expected 0 <= momentum < 1, got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"SGD: expected weight_decay >= 0, got {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("SGD: Nesterov momentum needs momentum > 0")
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)

    def step(self):
        for name, param, grad in self.net.named_params():
            direction = grad + self.weight_decay * param if self.weight_decay else grad
            if self.momentum:
                velocity = self._buffer("momentum", name, param)
                velocity *= self.momentum  # Eq. (1)
                velocity += direction  # Eq. (1)
                direction = direction + self.momentum * velocity if self.nesterov else velocity
            param -= self.lr * direction  # Eq. (1)


class Adam(Optimizer):
    r"""Adam (Kingma and Ba, 2015), with L2 weight decay added to the gradient.

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \tag{1}

    .. math::
        \theta_t = \theta_{t-1} - \eta\, \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}. \tag{2}
    """

    _state_kinds = ("m", "v", "step")

    def __init__(self, net, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(net, lr)
        beta1, beta2 = betas
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"Adam: expected betas in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"Adam: expected weight_decay >= 0, got {weight_decay}")
        self.betas, self.eps, self.weight_decay = (float(beta1), float(beta2)), float(eps), float(weight_decay)
        self.state["step"] = np.zeros((), dtype=np.int64)

    def step(self):
        beta1, beta2 = self.betas
        self.state["step"] += 1
        t = int(self.state["step"])
        for name, param, grad in self.net.named_params():
            g = grad + self.weight_decay * param if self.weight_decay else grad
            m = self._buffer("m", name, param)
            v = self._buffer("v", name, param)
            m *= beta1  # Eq. (1)
            m += (1 - beta1) * g  # Eq. (1)
            v *= beta2  # Eq. (1)
            v += (1 - beta2) * g * g  # Eq. (1)
            denominator = np.sqrt(v / (1 - beta2 ** t)) + self.eps
            param -= self.lr / (1 - beta1 ** t) * m / denominator  # Eq. (2)
