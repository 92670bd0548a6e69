"""The adaptive mode (docs/design.md §5, paper §6.5–6.6 and §7) against float64 references.

In adaptive mode one step moves the weights by δ = αΔ + μδ₀, Δ = −V the K-FAC
proposal and δ₀ the previous update, with (α, μ) minimising the quadratic model

    M(δ) = ½ δᵀ C δ + ∇hᵀ δ,   C = F + (λ + η) I,

F the exact mini-batch GGN (1/n) Σᵢ c·wᵢ·Jᵢᵀ Hᵢ Jᵢ on the first ⌈fraction·B⌉
examples. Every T₁ steps λ follows the Levenberg–Marquardt rule on
ρ = (h(θ+δ) − h(θ) + η/2(‖θ+δ‖² − ‖θ‖²)) / M̃(δ), M̃ the model without λ; with
`adapt_gamma`, every T₂ steps γ is the candidate of {γ, ω₂γ, γ/ω₂} whose best
(α, μ) gives the lowest M.

The references re-implement the tiny Dense networks in float64 TensorFlow
(`Reference`), take dense Jacobians with `tf.GradientTape.jacobian`, and solve
everything else in NumPy; nothing below reuses tf_kfac's own arithmetic except
where a test says so.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac
from tf_kfac import adaptive, training
from tf_kfac.blocks import KroneckerBlock

ETA = 1e-3  # l2_reg in the tests that exercise the η terms
TOL = 2e-4  # relative error of float32 quantities against float64 references (seen: ~1e-6)


# ------------------------------------------------------------------ reference
class Reference:
    """A float64 re-implementation of a Sequential stack of biased Dense and PReLU layers.

    θ is the concatenation of `model.trainable_variables` (kernel, bias per
    Dense layer, α per PReLU, each row-major), z the last layer's pre-activation
    (the logits for the cross-entropies), and the objective Keras's mean over
    the batch of c·(−log p(y|z)).

    Args:
        model: the Keras model (biased Dense and PReLU layers only, Dense last).
        kind: "sparse", "categorical", "bernoulli" or "gaussian".
    """

    def __init__(self, model: keras.Model, kind: str):
        self.layers = [layer for layer in model.layers if layer.trainable_weights]
        self.dense = [layer for layer in self.layers if isinstance(layer, keras.layers.Dense)]
        assert isinstance(self.layers[-1], keras.layers.Dense)
        variables = model.trainable_variables
        assert [id(v) for v in variables] == [id(v) for v in self._own_variables()]
        self.model = model
        self.kind = kind
        self.shapes = [tuple(v.shape) for v in variables]
        self.sizes = [math.prod(s) for s in self.shapes]

    def _own_variables(self):
        for layer in self.layers:
            if isinstance(layer, keras.layers.Dense):
                yield from (layer.kernel, layer.bias)
            else:
                assert isinstance(layer, keras.layers.PReLU)
                yield layer.alpha

    def fallback_mask(self) -> np.ndarray:
        """True on the entries of θ that belong to first-order (PReLU) variables."""
        flags = [not isinstance(layer, keras.layers.Dense) for layer in self.layers
                 for _ in (layer.trainable_weights)]
        return np.concatenate([np.full(size, flag)
                               for size, flag in zip(self.sizes, flags, strict=True)])

    def theta(self) -> np.ndarray:
        return np.concatenate([v.numpy().astype(np.float64).ravel()
                               for v in self.model.trainable_variables])

    def split(self, flat) -> list:
        """A flat vector (NumPy or tensor) as one piece per variable, variable-shaped."""
        pieces, start = [], 0
        for shape, size in zip(self.shapes, self.sizes, strict=True):
            pieces.append(tf.reshape(flat[start:start + size], shape))
            start += size
        return pieces

    def logits(self, theta, x) -> tf.Tensor:
        pieces = iter(self.split(theta))
        h = tf.constant(np.asarray(x, np.float64))
        for layer in self.layers:
            if isinstance(layer, keras.layers.Dense):
                s = h @ next(pieces) + next(pieces)
                h = layer.activation(s)
            else:  # PReLU: max(0, h) + α·min(0, h)
                h = tf.nn.relu(h) - next(pieces) * tf.nn.relu(-h)
        return s

    def losses(self, z, y) -> tf.Tensor:
        """Per-example Keras loss c·(−log p(y|z)) (up to constants in z)."""
        y = np.asarray(y)
        if self.kind == "sparse":
            return -tf.gather(tf.nn.log_softmax(z), y.astype(np.int64), batch_dims=1)
        y = tf.constant(y.astype(np.float64))
        if self.kind == "categorical":
            return -tf.reduce_sum(y * tf.nn.log_softmax(z), axis=-1)
        if self.kind == "bernoulli":
            return tf.reduce_mean(tf.nn.softplus(z) - y * z, axis=-1)
        return tf.reduce_mean(tf.square(y - z), axis=-1)

    def objective(self, theta, x, y) -> float:
        """h(θ): the mean loss over the batch (no L2 term)."""
        z = self.logits(tf.constant(theta), x)
        return float(tf.reduce_mean(self.losses(z, y)))

    def gradient(self, theta, x, y, l2_reg=0.0) -> np.ndarray:
        """∇h(θ) + ηθ."""
        theta_t = tf.constant(theta)
        with tf.GradientTape() as tape:
            tape.watch(theta_t)
            loss = tf.reduce_mean(self.losses(self.logits(theta_t, x), y))
        return tape.gradient(loss, theta_t).numpy() + l2_reg * theta

    def output_hessians(self, z: np.ndarray) -> np.ndarray:
        """c·H per example, H the Hessian of −log p w.r.t. z (n, k, k)."""
        n, k = z.shape
        if self.kind in ("sparse", "categorical"):
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            return np.stack([np.diag(q) - np.outer(q, q) for q in p])
        if self.kind == "bernoulli":
            p = 1.0 / (1.0 + np.exp(-z))
            return np.stack([np.diag(q * (1 - q)) for q in p]) / k
        return np.broadcast_to(2.0 * np.eye(k) / k, (n, k, k))

    def fisher(self, theta, x, weights=None) -> np.ndarray:
        """The dense GGN (1/n) Σᵢ wᵢ Jᵢᵀ (c·Hᵢ) Jᵢ over the examples of x."""
        theta_t = tf.constant(theta)
        with tf.GradientTape() as tape:
            tape.watch(theta_t)
            z = self.logits(theta_t, x)
        jac = tape.jacobian(z, theta_t).numpy()  # (n, k, P)
        hess = self.output_hessians(z.numpy())
        weights = np.ones(len(jac)) if weights is None else np.asarray(weights, np.float64)
        terms = np.einsum("i,ikp,ikl,ilq->pq", weights, jac, hess, jac)
        return terms / len(jac)

    # ------------------------------------------------------------- K-FAC
    def factors(self, opt) -> list[tuple[np.ndarray, np.ndarray]]:
        return [tuple(f.numpy().astype(np.float64) for f in opt.kronecker_factors(layer))
                for layer in self.dense]

    def proposal(self, grad: np.ndarray, inverses) -> np.ndarray:
        """Δ = −A⁻¹ [∇K; ∇b] G⁻¹ per Dense layer (`inverses` in order), −∇ for PReLU's α
        (the first-order fallback), flattened like θ."""
        pieces = iter(p.numpy() for p in self.split(grad))
        inverses = iter(inverses)
        out = []
        for layer in self.layers:
            if isinstance(layer, keras.layers.Dense):
                a_inv, g_inv = next(inverses)
                v = a_inv @ np.concatenate([next(pieces), next(pieces)[None]]) @ g_inv
                out += [-v[:-1].ravel(), -v[-1]]
            else:
                out.append(-next(pieces).ravel())
        return np.concatenate(out)


def tikhonov_inverses(a, g, gamma) -> tuple[np.ndarray, np.ndarray]:
    """(A + πγI)⁻¹, (G + (γ/π)I)⁻¹ with π = √((tr A/dim A)/(tr G/dim G)), float64."""
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    return (np.linalg.inv(a + pi * gamma * np.eye(len(a))),
            np.linalg.inv(g + gamma / pi * np.eye(len(g))))


def best_step(curvature, grad, proposal, previous):
    """(α, μ, M) minimising ½δᵀCδ + ∇ᵀδ over δ = αΔ + μδ₀ (μ = 0 when δ₀ = 0)."""
    basis = np.stack([proposal, previous] if np.any(previous) else [proposal], axis=1)
    gram = basis.T @ curvature @ basis
    linear = basis.T @ grad
    coefficients = np.linalg.solve(gram, -linear)
    model = 0.5 * coefficients @ gram @ coefficients + linear @ coefficients
    mu = coefficients[1] if len(coefficients) == 2 else 0.0
    return coefficients[0], mu, model


def rel(actual, desired) -> float:
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    return float(np.linalg.norm(actual - desired) / max(np.linalg.norm(desired), 1e-30))


# ------------------------------------------------------------------- models
def mlp(outputs=2, output_activation="softmax", hidden=4, inputs=3):
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(hidden, activation="tanh"),
        keras.layers.Dense(outputs, activation=output_activation),
    ])


def classification_data(rng, batch=6, inputs=3, classes=2):
    x = rng.normal(size=(batch, inputs)).astype("float32")
    return x, rng.integers(0, classes, batch)


def flat_buffers(opt) -> np.ndarray:
    return np.concatenate([m.numpy().astype(np.float64).ravel() for m in opt._kfac.state.momentums])


def take_step(opt, ref, x, y):
    """One `opt.step`; returns what the references need from before and after it."""
    record = {"theta": ref.theta(), "previous": flat_buffers(opt),
              "damping": float(opt._kfac.state.damping.numpy()),
              "gamma": float(opt._kfac.state.gamma.numpy())}
    record["logs"] = {key: float(value) for key, value in opt.step(x, y).items()}
    record["after"] = ref.theta()
    record["buffers"] = flat_buffers(opt)
    record["factors"] = ref.factors(opt)
    return record


def adaptive_kfac(**kwargs):
    settings = {"adaptive": True, "fisher": "exact", "quadratic_model_fraction": 1.0,
                "inverse_update_interval": 100, "seed": 3}
    settings.update(kwargs)
    return tf_kfac.KFAC(**settings)


# ------------------------------------------------------- 1. α and μ
def prelu_mlp():
    """A PReLU between the Dense layers: its α trains by the first-order fallback."""
    return keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4), keras.layers.PReLU(),
        keras.layers.Dense(2, activation="softmax")])


@pytest.mark.parametrize(("network", "momentum"), [
    ("tanh", 0.9), ("tanh", 0.0), ("prelu", 0.9)])
def test_alpha_and_mu_solve_the_quadratic_model_with_the_exact_fisher(network, momentum, rng):
    """Logged α, μ and M(δ) equal NumPy's 2×2 solve with the dense exact Fisher (1×1 on step 0
    and whenever momentum is off), and the weights move by αΔ + μδ₀, δ₀ kept in the momentum
    buffers. Δ is rebuilt from the step-0 factors (inverses are not refreshed later), and
    is −∇ for a first-order fallback variable (PReLU's α), which joins the quadratic model."""
    damping = 0.05
    model = mlp() if network == "tanh" else prelu_mlp()
    ref = Reference(model, "sparse")
    x, y = classification_data(rng)
    opt = adaptive_kfac(damping=damping, l2_reg=ETA, momentum=momentum)
    opt.attach(model, loss=keras.losses.SparseCategoricalCrossentropy())
    inverses = None
    for step in range(3):
        r = take_step(opt, ref, x, y)
        if inverses is None:  # computed at step 0 with γ = √(λ₀ + η), then kept
            inverses = [tikhonov_inverses(a, g, np.sqrt(damping + ETA)) for a, g in r["factors"]]
        kron = [b for b in opt._blocks if isinstance(b, KroneckerBlock)]
        for block, (a_inv, g_inv) in zip(kron, inverses, strict=True):
            assert rel(block.a_inverse.numpy(), a_inv) < TOL
            assert rel(block.g_inverse.numpy(), g_inv) < TOL

        grad = ref.gradient(r["theta"], x, y, ETA)
        delta = ref.proposal(grad, inverses)
        curvature = ref.fisher(r["theta"], x) + (r["damping"] + ETA) * np.eye(len(grad))
        previous = r["previous"] if momentum else np.zeros_like(r["previous"])
        alpha, mu, change = best_step(curvature, grad, delta, previous)

        assert step > 0 or not np.any(r["previous"])  # δ₀ = 0 on the first step
        assert r["logs"]["alpha"] == pytest.approx(alpha, rel=TOL), step
        assert r["logs"]["mu"] == pytest.approx(mu, rel=TOL, abs=1e-6), step
        assert r["logs"]["model_change"] == pytest.approx(change, rel=TOL), step
        if step > 0 and momentum:
            assert abs(mu) > 1e-3  # the 2×2 case is really exercised
        update = alpha * delta + mu * r["previous"]
        if network == "prelu":  # the fallback variable really moves
            assert np.all(np.abs(update[ref.fallback_mask()]) > 1e-6)
        assert rel(r["after"] - r["theta"], update) < TOL
        assert rel(r["buffers"], r["after"] - r["theta"]) < 1e-5  # δ₀ of the next step


# ------------------------------------------------------- 2. ΔᵀFΔ by JVPs
LOSS_CASES = {
    # name: (output units, output activation, loss, reference kind)
    "sparse_ce-softmax": (3, "softmax", "sparse_categorical_crossentropy", "sparse"),
    "sparse_ce-logits": (3, None, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                         "sparse"),
    "categorical_ce-softmax": (3, "softmax", "categorical_crossentropy", "categorical"),
    "binary_ce-sigmoid": (2, "sigmoid", "binary_crossentropy", "bernoulli"),
    "binary_ce-logits": (2, None, keras.losses.BinaryCrossentropy(from_logits=True),
                         "bernoulli"),
    "mse": (2, None, "mse", "gaussian"),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_fisher_products_by_jvp_equal_the_dense_fisher(case, rng):
    """The quadratic model's Gram matrix [uᵢᵀFuⱼ] (forward-mode JVPs of the network output
    through `training.step_context`, `output_jvp` and `fisher_gram`) equals the dense
    (1/n) Σ c·wᵢ·JᵢᵀHᵢJᵢ for each supported loss and output activation. The batch of 5
    with fraction ½ uses the first ⌈2.5⌉ = 3 examples; the sample weights are not 1."""
    outputs, activation, loss, kind = LOSS_CASES[case]
    model = mlp(outputs, activation)
    ref = Reference(model, kind)
    opt = tf_kfac.KFAC(adaptive=True, quadratic_model_fraction=0.5, seed=0)
    opt.attach(model, loss=loss)
    batch = 5
    x = rng.normal(size=(batch, 3)).astype("float32")
    weights = rng.uniform(0.5, 2.0, batch).astype("float32")
    context = training.step_context(
        opt._kfac.spec, opt._kfac.candidates, opt.quadratic_model_fraction,
        model.trainable_variables, x, tf.constant(weights), tf.constant(batch),
        lambda inputs: model(inputs, training=True), None)
    variables = model.trainable_variables
    tangents = [rng.normal(size=(2, ref.sizes[i])) for i in range(len(variables))]
    jvps = []
    for j in range(2):
        pieces = [tf.constant(t[j].reshape(v.shape), tf.float32)
                  for t, v in zip(tangents, variables, strict=True)]
        z, jvp = adaptive.output_jvp(context.output, variables, pieces)
        jvps.append(jvp)
    gram = adaptive.fisher_gram(context.output, jvps, z).numpy()

    theta = ref.theta()
    n = math.ceil(0.5 * batch)
    assert z.shape[0] == n
    np.testing.assert_allclose(z.numpy(), ref.logits(tf.constant(theta), x[:n]).numpy(),
                               rtol=1e-5, atol=1e-5)
    fisher = ref.fisher(theta, x[:n], weights[:n])
    u = np.stack([np.concatenate([t[j] for t in tangents]) for j in range(2)])
    expected = u @ fisher @ u.T
    assert rel(gram, expected) < TOL, (gram, expected)


# ------------------------------------------------------------ 3. ρ
def test_rho_is_the_reduction_ratio_of_the_undamped_model(rng):
    """Logged ρ equals (h(θ+δ) − h(θ) + η/2(‖θ+δ‖² − ‖θ‖²)) / M̃(δ) from float64: h on the
    whole batch, M̃ = ½δᵀ(F + ηI)δ + ∇ᵀδ with F on the first ⌈fraction·B⌉ = 3 of 6 examples
    and no λ; λ then follows the rule with ρ (T₁ = 1, so every step adapts)."""
    model = mlp()
    ref = Reference(model, "sparse")
    x, y = classification_data(rng)
    opt = adaptive_kfac(damping=0.01, l2_reg=ETA, damping_adaptation_interval=1,
                        quadratic_model_fraction=0.5)
    opt.attach(model, loss=keras.losses.SparseCategoricalCrossentropy())
    omega = 0.95
    for step in range(3):
        r = take_step(opt, ref, x, y)
        theta, shift = r["theta"], r["after"] - r["theta"]
        actual = (ref.objective(theta + shift, x, y) - ref.objective(theta, x, y)
                  + 0.5 * ETA * (np.sum((theta + shift) ** 2) - np.sum(theta**2)))
        grad = ref.gradient(theta, x, y, ETA)
        fisher = ref.fisher(theta, x[:3]) + ETA * np.eye(len(theta))
        predicted = 0.5 * shift @ fisher @ shift + grad @ shift
        rho = actual / predicted
        assert predicted < 0
        assert r["logs"]["rho"] == pytest.approx(rho, rel=1e-3), step
        damping = r["damping"]
        expected = damping * omega if rho > 0.75 else damping / omega if rho < 0.25 else damping
        assert r["logs"]["damping"] == pytest.approx(damping, rel=1e-6)  # λ used by the step
        assert float(opt._kfac.state.damping.numpy()) == pytest.approx(expected, rel=1e-5), step


# ------------------------------------------------------------ 4. λ
@pytest.mark.parametrize(("rho", "factor"), [
    (0.1, 1 / 0.95**3), (0.25, 1.0), (0.5, 1.0), (0.75, 1.0), (0.9, 0.95**3), (-2.0, 1 / 0.95**3)])
def test_levenberg_marquardt_rule(rho, factor):
    """λ ← ω₁λ for ρ > ¾, λ/ω₁ for ρ < ¼, unchanged between (bounds included), ω₁ = (19/20)^T₁."""
    assert adaptive.damping_factor(3) == pytest.approx(0.95**3)
    new = adaptive.adapt_damping(tf.constant(2.0), tf.constant(rho), 3, 1e-8, 1e8)
    assert float(new) == pytest.approx(2.0 * factor, rel=1e-6)


def run_damping(model, opt, x, y, steps):
    """Steps a custom loop; returns the λ before each step, the logs, and the final λ."""
    opt.attach(model, loss=keras.losses.MeanSquaredError())
    dampings, logs = [], []
    for _ in range(steps):
        dampings.append(float(opt._kfac.state.damping.numpy()))
        logs.append({key: float(value) for key, value in opt.step(x, y).items()})
    return dampings + [float(opt._kfac.state.damping.numpy())], logs


def expected_dampings(initial, steps, interval, factor, low, high):
    """λ before each step (and after the last) when every adaptation multiplies by `factor`."""
    out, damping = [initial], initial
    for step in range(steps):
        if step % interval == 0:
            damping = min(max(damping * factor, low), high)
        out.append(damping)
    return out


def regression_data(rng, batch=8, inputs=3, outputs=2):
    x = rng.normal(size=(batch, inputs)).astype("float32")
    y = x @ rng.normal(size=(inputs, outputs)) + 0.3 * rng.normal(size=(batch, outputs))
    return x, y.astype("float32")


def test_damping_shrinks_on_an_exact_quadratic_and_respects_min_damping(rng):
    """A linear model with MSE is a quadratic whose GGN is its Hessian, so with the exact
    Fisher on the whole batch ρ = 1 at every step; λ then shrinks by ω₁ = 0.95² at
    iterations 0, 2, 4 (T₁ = 2), stays put in between, and stops at min_damping."""
    x, y = regression_data(rng)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = adaptive_kfac(damping=1.0, damping_adaptation_interval=2, min_damping=0.85,
                        momentum=0.9)
    dampings, logs = run_damping(model, opt, x, y, steps=6)
    for step in range(0, 6, 2):
        assert logs[step]["rho"] == pytest.approx(1.0, abs=1e-3), (step, logs[step])
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]  # real progress: ρ measures real changes
    expected = expected_dampings(1.0, 6, 2, 0.95**2, 0.85, 1e8)
    assert expected[1] > 0.85 and expected[-1] == 0.85  # the bound is reached
    np.testing.assert_allclose(dampings, expected, rtol=1e-6)


class _PeriodicRegularizer(keras.regularizers.Regularizer):
    """Σ (1 − cos 10w): steep, periodic, and invisible to the Fisher."""

    def __call__(self, w):
        return tf.reduce_sum(1.0 - tf.cos(10.0 * w))


def test_damping_grows_when_the_step_overshoots_and_respects_max_damping(rng):
    """A steep periodic kernel regulariser (1 − cos 10w) is invisible to the Fisher, so the
    quadratic model mispredicts and the loss rises (ρ < ¼): λ grows by 1/ω₁ at each
    adaptation and stops at max_damping. ρ's numerator sees the regulariser at θ + δ:
    the first step raises the loss, and its ρ is negative."""
    x, y = regression_data(rng)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(
        2, kernel_regularizer=_PeriodicRegularizer())])
    # λ is relative to the loss's scale c = 1/2 (mse over 2 outputs): λ = 2 damps by 1.
    opt = adaptive_kfac(damping=2.0, damping_adaptation_interval=2, max_damping=2.4,
                        momentum=0.9)
    dampings, logs = run_damping(model, opt, x, y, steps=6)
    assert logs[1]["loss"] > logs[0]["loss"] and logs[0]["rho"] < 0
    for step in range(0, 6, 2):
        assert logs[step]["rho"] < 0.25, (step, logs[step])
    expected = expected_dampings(2.0, 6, 2, 0.95**-2, 1e-8, 2.4)
    assert expected[1] < 2.4 and expected[-1] == 2.4
    np.testing.assert_allclose(dampings, expected, rtol=1e-6)


# ------------------------------------------------------------ 5. γ
def test_gamma_adaptation_picks_the_candidate_with_the_lowest_quadratic_model(rng):
    """With adapt_gamma and T₂ = 3, at iterations 0, 3, 6 the logged γ is the candidate of
    {γ, ω₂γ, γ/ω₂} (ω₂ = 0.95^1.5) whose proposal, with its best (α, μ), minimises the damped
    M — recomputed in float64 from this step's factors, dense Fisher and δ₀ — the stored
    inverses are the factored-Tikhonov inverses at that γ, and the step uses them. In
    between, γ is kept. Without adapt_gamma γ would be √(λ + η)."""
    model = mlp()
    ref = Reference(model, "sparse")
    x, y = classification_data(rng)
    interval = 3
    omega = 0.95 ** (interval / 2)
    assert adaptive.gamma_factor(interval) == pytest.approx(omega)
    opt = adaptive_kfac(damping=0.05, l2_reg=ETA, momentum=0.9, adapt_gamma=True,
                        gamma_adaptation_interval=interval)
    opt.attach(model, loss=keras.losses.SparseCategoricalCrossentropy())
    assert float(opt._kfac.state.gamma.numpy()) == pytest.approx(np.sqrt(0.05 + ETA))
    choices = []
    for step in range(7):
        r = take_step(opt, ref, x, y)
        gamma = r["logs"]["gamma"]
        assert float(opt._kfac.state.gamma.numpy()) == pytest.approx(gamma, rel=1e-6)
        if step % interval:
            assert gamma == pytest.approx(r["gamma"], rel=1e-6), step
            continue
        grad = ref.gradient(r["theta"], x, y, ETA)
        curvature = ref.fisher(r["theta"], x) + (r["damping"] + ETA) * np.eye(len(grad))
        candidates = [r["gamma"], omega * r["gamma"], r["gamma"] / omega]
        results = []
        for candidate in candidates:
            inverses = [tikhonov_inverses(a, g, candidate) for a, g in r["factors"]]
            delta = ref.proposal(grad, inverses)
            results.append((inverses, best_step(curvature, grad, delta, r["previous"])))
        values = np.array([result[2] for _, result in results])
        best = int(np.argmin(values))
        gap = np.sort(values)[1] - values[best]
        # float32 M is good to ~1e-6 relative; the closest call here is ~2e-4.
        assert gap > 1e-4 * abs(values[best]), values
        choices.append(best)
        assert gamma == pytest.approx(candidates[best], rel=1e-6), (step, values)
        inverses, (alpha, mu, change) = results[best]
        kron = [b for b in opt._blocks if isinstance(b, KroneckerBlock)]
        for block, (a_inv, g_inv) in zip(kron, inverses, strict=True):
            assert rel(block.a_inverse.numpy(), a_inv) < TOL
            assert rel(block.g_inverse.numpy(), g_inv) < TOL
        assert r["logs"]["alpha"] == pytest.approx(alpha, rel=TOL)
        assert r["logs"]["model_change"] == pytest.approx(change, rel=TOL)
    assert len(set(choices)) > 1, choices  # not always the same candidate


# ------------------------------------------------------------ 6. saving
ADAPTIVE_STATE = ("damping", "gamma", "alpha", "mu", "rho", "model_change")


def fit_settings():
    return {"adaptive": True, "adapt_gamma": True, "l2_reg": ETA, "damping": 0.05, "seed": 3,
            "damping_adaptation_interval": 1, "gamma_adaptation_interval": 2,
            "inverse_update_interval": 3, "quadratic_model_fraction": 0.5}


def fit_epochs(model, x, y, epochs):
    history = model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return {key: values[-1] for key, values in history.history.items()}


def test_keras_file_saved_mid_training_resumes_the_adaptive_state_exactly(tmp_path, rng):
    """After 2 steps the model is saved to a `.keras` file and trains on for 2 more (the
    uninterrupted run); the file, loaded with `keras.models.load_model`, trains the same 2
    steps and ends with the same λ, γ, α, μ, ρ, M, momentum buffers and weights (sampled
    Fisher with a fixed seed; λ and γ both move before the save, so restoring them matters)."""
    x, y = classification_data(rng, batch=16)
    model = mlp()
    model.compile(optimizer=tf_kfac.KFAC(**fit_settings()), loss="sparse_categorical_crossentropy")
    fit_epochs(model, x, y, 1)
    opt = model.optimizer
    assert float(opt._kfac.state.damping.numpy()) != pytest.approx(0.05)
    assert float(opt._kfac.state.gamma.numpy()) != pytest.approx(np.sqrt(0.05 + ETA))
    model.save(tmp_path / "mid.keras")
    straight_logs = fit_epochs(model, x, y, 1)

    keras.utils.set_random_seed(0)  # the resumed run owes nothing to the global seed
    loaded = keras.models.load_model(tmp_path / "mid.keras")
    resumed_logs = fit_epochs(loaded, x, y, 1)

    for name in ADAPTIVE_STATE:
        np.testing.assert_allclose(getattr(loaded.optimizer._kfac.state, name).numpy(),
                                   getattr(opt._kfac.state, name).numpy(), rtol=1e-6,
                                   err_msg=name)
    assert int(loaded.optimizer.iterations.numpy()) == int(opt.iterations.numpy())
    for key in ("damping", "gamma", "alpha", "mu", "rho", "model_change", "loss"):
        assert resumed_logs[key] == pytest.approx(straight_logs[key], rel=1e-6), key
    for a, b in zip(loaded.optimizer._kfac.state.momentums, opt._kfac.state.momentums, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------- 7. estimators, layers, eager
def convnet():
    """Conv2D and Dense (Kronecker blocks) around a BatchNormalization (first-order)."""
    return keras.Sequential([
        keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3, activation="relu"),
        keras.layers.BatchNormalization(), keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax")])


@pytest.mark.parametrize(("fisher", "run_eagerly"), [
    ("sampled", False), ("empirical", False), ("exact", False), ("sampled", True)])
def test_adaptive_mode_trains_conv_dense_and_batchnorm_with_every_estimator(
        fisher, run_eagerly, rng):
    """`fit` in adaptive mode (with momentum and L2; γ adaptation in the eager run, whose
    tracing would be slow) on Conv2D + BatchNorm + Dense lowers the loss on a fixed batch
    with every Fisher estimator, compiled and eager, keeps every log finite, skips no step,
    and also moves the BatchNormalization's γ/β (its per-unit block)."""
    x = rng.normal(size=(16, 5, 5, 2)).astype("float32")
    y = rng.integers(0, 3, 16)
    model = convnet()
    batchnorm = model.layers[1]
    before = [w.numpy().copy() for w in batchnorm.trainable_weights]
    opt = tf_kfac.KFAC(adaptive=True, adapt_gamma=run_eagerly, fisher=fisher, l2_reg=ETA,
                       damping=0.1, damping_adaptation_interval=2, gamma_adaptation_interval=2,
                       seed=5)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", run_eagerly=run_eagerly)
    history = model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0).history
    kinds = {block.kind for block in opt._blocks}
    assert {"conv2d", "dense", "scale_shift"} <= kinds, kinds
    for key in ("loss", "damping", "gamma", "alpha", "mu", "rho", "model_change"):
        assert np.all(np.isfinite(history[key])), (key, history[key])
    assert history["skipped_steps"][-1] == 0
    assert history["loss"][-1] < 0.9 * history["loss"][0], history["loss"]
    assert all(v < 0 for v in history["model_change"]), history["model_change"]
    for old, new in zip(before, batchnorm.trainable_weights, strict=True):
        assert not np.allclose(old, new.numpy())


def test_step_works_inside_tf_function(rng):
    """`opt.step` traced by `tf.function` in adaptive mode gives the eager step's logs."""
    x, y = classification_data(rng)
    results = []
    for wrap in (lambda f: f, tf.function):
        keras.utils.set_random_seed(7)
        model = mlp()
        opt = adaptive_kfac(damping=0.05, momentum=0.9, l2_reg=ETA,
                            damping_adaptation_interval=1)
        opt.attach(model, loss=keras.losses.SparseCategoricalCrossentropy())
        step = wrap(opt.step)
        logs = [{k: float(v) for k, v in step(x, y).items()} for _ in range(3)]
        results.append((logs, model.get_weights()))
    (eager_logs, eager_weights), (graph_logs, graph_weights) = results
    for eager, graph in zip(eager_logs, graph_logs, strict=True):
        for key in eager:
            assert graph[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(eager_weights, graph_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------ 8. behaviour
def ill_conditioned_regression():
    """x = (z·s)Q with scales s spanning 1e-2..1e2 and a random rotation Q; y = tanh(zW)."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((128, 8))
    rotation, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    x = (z * np.logspace(-2, 2, 8)) @ rotation
    y = np.tanh(z @ rng.standard_normal((8, 2)) / np.sqrt(8))
    return x.astype("float32"), y.astype("float32")


def training_loss_after(optimizer, init_seed, steps=10):
    """(initial, final) training MSE of an 8-8-2 tanh MLP after `steps` full-batch steps."""
    x, y = ill_conditioned_regression()
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(8, activation="tanh",
                           kernel_initializer=keras.initializers.GlorotUniform(init_seed)),
        keras.layers.Dense(2, kernel_initializer=keras.initializers.GlorotUniform(init_seed + 1)),
    ])
    model.compile(optimizer=optimizer, loss="mse")
    initial = float(model.evaluate(x, y, batch_size=128, verbose=0))
    batches = tf.data.Dataset.from_tensors((x, y)).repeat()  # one full batch per step
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    return initial, float(model.evaluate(x, y, batch_size=128, verbose=0))


@pytest.mark.parametrize("init_seed", [0, 30])
def test_adaptive_mode_beats_the_fixed_mode_defaults_early_on_an_ill_conditioned_problem(
        init_seed):
    """On a tanh MLP whose inputs have covariance eigenvalues 1e-4..1e4, 10 full-batch steps
    of the adaptive mode at its defaults (λ₀ = 1, fraction 1, T₁ = 5) reach a much lower
    training MSE than 10 steps of the fixed mode at its defaults (lr 0.1, momentum 0.5,
    λ = 1e-3, KL-clip 1e-3), whose KL-clip holds back the early steps.

    Measured (this machine), initial → fixed / adaptive after 10 steps: init seed 0:
    1.94 → 1.08 / 0.413; init seed 30: 1.19 → 0.629 / 0.401 (the least favourable of 8
    seeds; ratios 0.15–0.64). The advantage does not last: the adaptive run then crawls near
    0.38 with ρ often negative and λ growing (the GGN model mispredicts the steps of this
    strongly nonlinear net), and the fixed mode overtakes it — after 150 steps, seed 0:
    fixed 0.330, adaptive 0.378. On a 10-8-4-2-4-8-10 tanh autoencoder the fixed mode was
    ahead after 40 steps for all 5 seeds tried (adaptive/fixed 1.14–2.09). Only the early,
    robust advantage is asserted here.
    """
    initial, fixed = training_loss_after(tf_kfac.KFAC(seed=0), init_seed)
    _, adaptive_loss = training_loss_after(tf_kfac.KFAC(seed=0, adaptive=True), init_seed)
    report = f"initial {initial:.4g}, fixed {fixed:.4g}, adaptive {adaptive_loss:.4g}"
    print(report)
    assert fixed < 0.7 * initial, report  # the fixed mode is a working baseline
    assert adaptive_loss < 0.75 * fixed, report


# ------------------------------------------------------------ 9. errors
MISCONFIGURATIONS = {
    "adapt_gamma-without-adaptive": ({"adapt_gamma": True}, r"adapt_gamma=True.*adaptive=True"),
    "weight_decay": ({"weight_decay": 1e-4}, r"adaptive=True.*weight_decay.*l2_reg"),
    "clipnorm": ({"clipnorm": 1.0}, r"adaptive=True.*clipnorm"),
    "clipvalue": ({"clipvalue": 1.0}, r"adaptive=True.*clipvalue"),
    "global_clipnorm": ({"global_clipnorm": 1.0}, r"adaptive=True.*global_clipnorm"),
    "damping-schedule": (
        {"damping": keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.9)},
        r"adaptive=True.*schedule"),
    "damping-below-min": ({"damping": 1e-9}, r"damping.*min_damping"),
    "damping-above-max": ({"damping": 10.0, "max_damping": 1.0}, r"damping.*max_damping"),
    "fraction-0": ({"quadratic_model_fraction": 0.0}, "quadratic_model_fraction"),
    "fraction-1.5": ({"quadratic_model_fraction": 1.5}, "quadratic_model_fraction"),
    "T1-0": ({"damping_adaptation_interval": 0}, "damping_adaptation_interval"),
    "T2-0": ({"gamma_adaptation_interval": 0}, "gamma_adaptation_interval"),
    "max-below-min": ({"min_damping": 1.0, "max_damping": 0.5}, "max_damping"),
}


# Arguments that only the adaptive mode refuses.
FINE_IN_FIXED_MODE = {"weight_decay", "clipnorm", "clipvalue", "global_clipnorm",
                      "damping-schedule", "damping-below-min", "damping-above-max"}


@pytest.mark.parametrize("case", list(MISCONFIGURATIONS))
def test_adaptive_misconfiguration_is_rejected(case):
    """Arguments the adaptive mode cannot honour fail in the constructor, naming them
    (`adaptive=True` is added to every case but the first); those that the fixed mode
    honours are accepted there."""
    kwargs, match = MISCONFIGURATIONS[case]
    if case in FINE_IN_FIXED_MODE:
        tf_kfac.KFAC(**kwargs)
    if "adapt_gamma" not in kwargs:
        kwargs = {"adaptive": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        tf_kfac.KFAC(**kwargs)


@pytest.mark.parametrize("driver", ["fit", "attach"])
def test_adaptive_mode_with_an_unknown_loss_names_the_supported_losses(driver, rng):
    """With fisher="empirical" an unknown loss ("huber") trains in the fixed mode, but the
    adaptive mode needs the loss's output Hessian: a ValueError lists the supported losses."""
    x, y = regression_data(rng)
    tf_kfac.KFAC(fisher="empirical").attach(mlp(2, None), loss="huber")  # the fixed mode is fine
    model = mlp(2, None)
    opt = tf_kfac.KFAC(adaptive=True, fisher="empirical")
    with pytest.raises(ValueError, match="adaptive=True") as error:
        if driver == "fit":
            model.compile(optimizer=opt, loss="huber")
            model.fit(x, y, verbose=0)
        else:
            opt.attach(model, loss="huber")
    for name in tf_kfac.SUPPORTED_LOSSES:
        assert name in str(error.value)
