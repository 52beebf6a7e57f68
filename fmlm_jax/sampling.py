"""Samplers (SPEC §6) and guidance (SPEC §11), each jit-compiled with its step loop inside.

    ids = generate(params, model_config, z0, num_steps, gamma=0.8, rng=key)     # FLM or FMLM
    ids = generate(..., auto=AutoGuidance(weak_config, eta=2.0), weak_params=w)  # autoguidance
    ids = generate(..., reward=RewardGuidance(rewards.keyword(ids_of_words), lam=1.0))

Runs are reproducible: the caller passes the initial noise z0 (B, L, K) (`initial_noise`).
With `projected=True` (the config switch `flm.projected_noise`, SPEC §10) z0 is ε̃ (B, L, d)
instead and the samplers carry h = z·E, whose updates are the same linear combinations with
every probability vector δ replaced by δ·E and every Gaussian draw ξ by ε̃·Cᵀ (C·Cᵀ = EᵀE):
equal in distribution, no (B, L, K) state. With autoguidance by a weak model of another input
matrix, the projected state holds both views {strong: z·E_S, weak: z·E_W}, drawn jointly from
ε̃ (B, L, d_S + d_W) (`interpolant.joint_noise_factors`), as distillation does.

A sampler sees its network(s) through a `Denoiser`: the prediction its updates use (`probs`),
the scores whose argmax is its last step (`final`), and how probability vectors and noise
enter the state (`lift`, `noise`). Autoguidance is a denoiser (SPEC §11: D^η from the strong
and the weak model); reward guidance adds a drift to the update.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmlm_jax import interpolant
from fmlm_jax import model as model_lib
from fmlm_jax.schedule import Schedule

EULER_EPS = 1e-5  # the reference's guard in (D − z)/(1 − t + 1e-5)
GUIDANCE_MODES = ("P", "L")  # autoguidance on probabilities (default) or on capped logits
NORM_EPS = 1e-8


# ============================================================================ denoisers


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """What a sampler needs of its network(s), in the form of its state."""

    probs: Callable  # (state, τ_s, τ_t) → D (B, L, K), the prediction the updates use
    final: Callable  # (state, τ_s, τ_t) → (B, L, K) scores: the last step is their argmax
    lift: Callable  # D (B, L, K) → the state's form (identity, or D·E per view)
    noise: Callable  # (key, state) → ξ ~ N(0, I) in the state's form


def _dense_noise(key, state):
    return jax.random.normal(key, state.shape, jnp.float32)


def network_denoiser(params, model_config, projected: bool = False) -> Denoiser:
    """One network: D = softmax of its capped logits; the last step's argmax on those logits."""
    scores = model_lib.denoiser_scores(params, model_config, embedded=projected)
    if not projected:
        return Denoiser(lambda z, a, b: jax.nn.softmax(scores(z, a, b), axis=-1), scores, lambda d: d,
                        _dense_noise)
    embedding = params["vocab_embed"]["embedding"]
    factor = interpolant.projected_noise_factor(embedding)

    def noise(key, state):  # ξ·E ~ N(0, EᵀE) per token, drawn as ε̃·Cᵀ
        return jnp.einsum("bld,ed->ble", jax.random.normal(key, state.shape, jnp.float32), factor)

    return Denoiser(lambda z, a, b: jax.nn.softmax(scores(z, a, b), axis=-1), scores,
                    lambda d: interpolant.lift(d, embedding), noise)


@dataclasses.dataclass(frozen=True)
class AutoGuidance:
    """Autoguidance (SPEC §11, after Karras et al.): a weak model W beside the strong S.

    mode 'P' (default): D^η = D_S + η·(D_S − D_W) (may leave the simplex; the Euler and γ
    updates are affine in D, so this is also velocity guidance); 'L': log D^η =
    log_softmax((1+η)·ℓ̃_S − η·ℓ̃_W) on the capped logits (stays on the simplex). η = 0 is off.
    For FMLM this is B1: the same combination of the two flow maps' δ_{s,t}, no training.
    """

    weak_config: ml_collections.FrozenConfigDict
    eta: float
    mode: str = "P"


def _same_architecture(a, b) -> bool:
    return model_lib.resolve_config(a).to_dict() == model_lib.resolve_config(b).to_dict()


def _pair_scores(strong, strong_cfg, weak, weak_cfg, projected: bool):
    """(state, τ_s, τ_t) → (ℓ̃_S, ℓ̃_W): in one batched call when the two models have the same
    architecture (their parameters stacked), else two calls. Projected states are the dict of
    views {'strong', 'weak'}."""
    if _same_architecture(strong_cfg, weak_cfg):
        stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), strong, weak)

        def both(state, tau_s, tau_t):
            def one(params, view):
                return model_lib.denoiser_scores(params, strong_cfg, embedded=projected)(view, tau_s, tau_t)
            views = jnp.stack([state["strong"], state["weak"]]) if projected else None
            out = jax.vmap(one, in_axes=(0, 0 if projected else None))(stacked, views if projected else state)
            return out[0], out[1]

        return both
    s = model_lib.denoiser_scores(strong, strong_cfg, embedded=projected)
    w = model_lib.denoiser_scores(weak, weak_cfg, embedded=projected)

    def pair(state, tau_s, tau_t):
        if projected:
            return s(state["strong"], tau_s, tau_t), w(state["weak"], tau_s, tau_t)
        return s(state, tau_s, tau_t), w(state, tau_s, tau_t)

    return pair


def autoguided_denoiser(strong, strong_cfg, weak, guide: AutoGuidance, projected: bool = False) -> Denoiser:
    """The autoguided denoiser D^η of `guide` (see `AutoGuidance`)."""
    pair = _pair_scores(strong, strong_cfg, weak, guide.weak_config, projected)
    eta = guide.eta

    def probs(state, tau_s, tau_t):
        ls, lw = pair(state, tau_s, tau_t)
        if guide.mode == "L":
            return jax.nn.softmax((1.0 + eta) * ls - eta * lw, axis=-1)
        ds = jax.nn.softmax(ls, axis=-1)
        return ds + eta * (ds - jax.nn.softmax(lw, axis=-1))

    def final(state, tau_s, tau_t):
        if guide.mode == "L":
            ls, lw = pair(state, tau_s, tau_t)
            return (1.0 + eta) * ls - eta * lw
        return probs(state, tau_s, tau_t)

    if not projected:
        return Denoiser(probs, final, lambda d: d, _dense_noise)
    embeddings = {"strong": strong["vocab_embed"]["embedding"], "weak": weak["vocab_embed"]["embedding"]}
    factors = dict(zip(embeddings, interpolant.joint_noise_factors(list(embeddings.values())), strict=True))

    def lift(d):
        return {name: interpolant.lift(d, e) for name, e in embeddings.items()}

    def noise(key, state):  # one ε̃ for both views: they stay views of one z
        width = factors["strong"].shape[0]
        eps = jax.random.normal(key, (*state["strong"].shape[:2], width), jnp.float32)
        return {name: jnp.einsum("blr,rd->bld", eps, a) for name, a in factors.items()}

    return Denoiser(probs, final, lift, noise)


def _start(params, z0, projected: bool, weak=None):
    """The initial state: z0; h0 = ε̃·Cᵀ (the law of z₀·E) when projected; with a weak model
    of its own input matrix, both views from ε̃ (B, L, d_S + d_W)."""
    if not projected:
        return z0.astype(jnp.float32)
    if weak is None:
        factor = interpolant.projected_noise_factor(params["vocab_embed"]["embedding"])
        return jnp.einsum("bld,ed->ble", z0.astype(jnp.float32), factor)
    pair = [params["vocab_embed"]["embedding"], weak["vocab_embed"]["embedding"]]
    a_strong, a_weak = interpolant.joint_noise_factors(pair)
    return {name: jnp.einsum("blr,rd->bld", z0.astype(jnp.float32), a)
            for name, a in (("strong", a_strong), ("weak", a_weak))}


# ============================================================================ reward guidance


@dataclasses.dataclass(frozen=True)
class RewardGuidance:
    """Reward guidance (SPEC §11) through a differentiable look-ahead.

    reward: soft sequences p (B, L, K) → (B,) (fmlm_jax.rewards). lam: λ, the strength.
    guided_steps: K_g, how many first steps are guided (None: ⌈N/4⌉), then plain steps.
    n_opt: gradient-ascent steps per guided step (FMLM, FMRG-J). decay: λ_k = λ(1 − k/K_g)
    instead of a constant λ. normalize: the velocity-norm normalisation ĝ = g·‖v‖/(‖g‖ + 1e-8)
    (norms per sequence); False: the raw gradient.
    """

    reward: Callable
    lam: float
    guided_steps: int | None = None
    n_opt: int = 1
    decay: bool = False
    normalize: bool = True

    def steps(self, num_steps: int) -> int:
        return min(num_steps, -(-num_steps // 4) if self.guided_steps is None else int(self.guided_steps))

    def strength(self, k, num_steps: int):
        if not self.decay:
            return self.lam
        return self.lam * (1.0 - k / self.steps(num_steps))


def _sequence_norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(x * x, axis=(1, 2), keepdims=True))


def _direction(g, v, normalize: bool):
    return g * _sequence_norm(v) / (_sequence_norm(g) + NORM_EPS) if normalize else g


def _reward_gradient(guide: RewardGuidance, predict: Callable, z):
    """(r (B,), ∇_z Σ_b r_b, the prediction) for the look-ahead `predict(z)` → p (B, L, K)."""
    def total(z):
        p = predict(z)
        r = guide.reward(p)
        return r.sum(), (r, p)

    (_, (r, p)), g = jax.value_and_grad(total, has_aux=True)(z)
    return r, g, p


# ============================================================================ FLM (Euler)


def flm_time_grid(vocab_size: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """τ_i = i/N and t_i = T(τ_i), i = 0..N (float64 host values, the reference spline)."""
    tau = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    return tau, Schedule(vocab_size).tau_to_t(tau)


def euler_loop(den: Denoiser, state0, tau, t, num_steps: int, reward: RewardGuidance | None = None):
    """The Euler sampler (SPEC §6) on any state form: for i < N−1
    z ← z + (t_{i+1} − t_i)·(v + λ·ĝ), v = (D_{τ_i}(z) − z)/(1 − t_i + 1e-5), the reward drift λ·ĝ
    only on the first K_g steps (dense states); then argmax of `den.final` at τ_{N−1}."""
    batch = jax.tree_util.tree_leaves(state0)[0].shape[0]
    guided = 0 if reward is None else reward.steps(num_steps)

    def times(i):
        return jnp.full((batch,), tau[i])

    def plain_step(i, state):
        target = den.lift(den.probs(state, times(i), times(i)))
        return jax.tree_util.tree_map(
            lambda x, d: x + (t[i + 1] - t[i]) * (d - x) / (1.0 - t[i] + EULER_EPS), state, target)

    def guided_step(i, z):
        _, g, d = _reward_gradient(reward, lambda z: den.probs(z, times(i), times(i)), z)
        v = (d - z) / (1.0 - t[i] + EULER_EPS)
        drift = reward.strength(i, num_steps) * _direction(g, v, reward.normalize)
        return z + (t[i + 1] - t[i]) * (v + drift)

    first_plain = min(guided, num_steps - 1)
    state = jax.lax.fori_loop(0, first_plain, guided_step, state0) if first_plain else state0
    state = jax.lax.fori_loop(first_plain, num_steps - 1, plain_step, state)
    # The last step jumps to the prediction; its argmax is taken on `final` (for one network the
    # capped logits: softmax is monotone, which skips a (B, L, K) log-softmax and exp).
    final = den.final(state, times(num_steps - 1), times(num_steps - 1))
    return jnp.argmax(final, axis=-1).astype(jnp.int32)


# ============================================================================ FMLM (γ-sampler)


def fmlm_time_grid(vocab_size: int, num_steps: int, gamma: float) -> dict[str, np.ndarray]:
    """Per-step times of the γ-sampler (SPEC §6), float64 host values, shape (N,) each.

    Step i: τ_s = i/N, s = T(τ_s), t⁺ = T((i+1)/N), σ = 1 − t⁺, σ̃ = σ·√(1−γ²),
    t̃ = 1 − σ̃, τ̃ = τ(t̃) (the grid point itself when γ = 0).
    """
    schedule = Schedule(vocab_size)
    grid = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    tau_s, tau_next = grid[:-1], grid[1:]
    s, t_next = schedule.tau_to_t(tau_s), schedule.tau_to_t(tau_next)
    sigma = 1.0 - t_next
    sigma_tilde = sigma * np.sqrt(1.0 - gamma**2)
    t_tilde = 1.0 - sigma_tilde
    tau_tilde = tau_next if gamma == 0.0 else schedule.t_to_tau(t_tilde)
    return dict(tau_s=tau_s, s=s, t_next=t_next, sigma=sigma, sigma_tilde=sigma_tilde,
                t_tilde=t_tilde, tau_tilde=tau_tilde)


def gamma_loop(den: Denoiser, state0, grid: dict, gamma: float, rng, reward: RewardGuidance | None = None):
    """The γ-sampler (SPEC §6) on any state form.

    Step i: δ = δ_{τ_i→τ̃}(z); z̃ = ((1−t̃)/(1−s))·z + ((t̃−s)/(1−s))·δ; for γ > 0,
    z ← z̃ + (σ̃ − σ)·δ + γσ·ξ (the interpolant's noise level σ restored at t⁺). The last step
    returns argmax δ. Reward guidance (FMRG-J, SPEC §11; dense states) on the first K_g steps:
    Δ from `n_opt` gradient-ascent steps of the reward of the look-ahead δ_{τ_i,1}, each
    λ_k·ĝ with ĝ normalised by ‖v‖, v = (δ_{τ_i,1}(z) − z)/(1 − s); z̃ += (t̃ − s)·Δ. A guided
    last step returns argmax(z + (1 − s)·(v + Δ)) = argmax(δ_{τ_i,1}(z) + (1 − s)·Δ).
    """
    g = {k: jnp.asarray(v, jnp.float32) for k, v in grid.items()}
    num_steps = grid["tau_s"].shape[0]
    batch = jax.tree_util.tree_leaves(state0)[0].shape[0]
    guided = 0 if reward is None else reward.steps(num_steps)

    def full(x):
        return jnp.full((batch,), x)

    def ascent(i, z):
        """(Δ, δ_{τ_i,1}(z)): FMRG-J's gradient ascent on the look-ahead's reward."""
        def predict(x):
            return den.probs(x, full(g["tau_s"][i]), full(1.0))

        _, grad, lookahead = _reward_gradient(reward, predict, z)
        v = (lookahead - z) / (1.0 - g["s"][i])
        total, moved = jnp.zeros_like(z), z
        for k in range(reward.n_opt):
            if k:
                _, grad, _ = _reward_gradient(reward, predict, moved)
            step = reward.strength(i, num_steps) * _direction(grad, v, reward.normalize)
            total, moved = total + step, moved + step
        return total, lookahead

    def step(i, z, guide: bool):
        delta = den.lift(den.probs(z, full(g["tau_s"][i]), full(g["tau_tilde"][i])))
        s, t_tilde = g["s"][i], g["t_tilde"][i]
        z_tilde = jax.tree_util.tree_map(lambda x, d: ((1.0 - t_tilde) * x + (t_tilde - s) * d) / (1.0 - s),
                                         z, delta)
        if guide:
            z_tilde = z_tilde + (t_tilde - s) * ascent(i, z)[0]
        if gamma == 0.0:
            return z_tilde
        xi = den.noise(jax.random.fold_in(rng, i), z)
        return jax.tree_util.tree_map(
            lambda zt, d, e: zt + (g["sigma_tilde"][i] - g["sigma"][i]) * d + gamma * g["sigma"][i] * e,
            z_tilde, delta, xi)

    last = num_steps - 1
    first_plain = min(guided, last)
    z = jax.lax.fori_loop(0, first_plain, lambda i, z: step(i, z, True), state0) if first_plain else state0
    z = jax.lax.fori_loop(first_plain, last, lambda i, z: step(i, z, False), z)
    if guided > last:  # the last step is guided too (e.g. one step)
        delta_guided, lookahead = ascent(last, z)
        final = lookahead + (1.0 - g["s"][last]) * delta_guided
    else:
        final = den.final(z, full(g["tau_s"][last]), full(g["tau_tilde"][last]))
    return jnp.argmax(final, axis=-1).astype(jnp.int32)


# ============================================================================ the public samplers


def _check(config, z0, num_steps: int, projected: bool = False, width: int | None = None
           ) -> ml_collections.FrozenConfigDict:
    cfg = model_lib.resolve_config(config)
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if width is None:
        width = cfg.hidden_size if projected else cfg.vocab_size
    what = "the noise width of the projected sampler" if projected else "vocab_size K"
    if z0.ndim != 3 or z0.shape[-1] != width:
        raise ValueError(f"z0 must be (B, L, {width}) with {what}, got {tuple(z0.shape)}")
    return ml_collections.FrozenConfigDict(cfg)


def _check_guidance(config, auto: AutoGuidance | None, weak_params, reward: RewardGuidance | None,
                    projected: bool) -> None:
    if auto is not None:
        if weak_params is None:
            raise ValueError("autoguidance needs weak_params (the weak model W's weights)")
        if auto.mode not in GUIDANCE_MODES:
            raise ValueError(f"autoguidance mode must be one of {GUIDANCE_MODES}, got {auto.mode!r}")
        weak = model_lib.resolve_config(auto.weak_config)
        strong = model_lib.resolve_config(config)
        if (weak.vocab_size, weak.two_time) != (strong.vocab_size, strong.two_time):
            raise ValueError(f"the weak model (vocab {weak.vocab_size}, two_time={weak.two_time}) must share "
                             f"the strong model's vocabulary and kind (vocab {strong.vocab_size}, "
                             f"two_time={strong.two_time})")
    if reward is not None:
        if projected:
            raise ValueError("reward guidance runs on dense states (its gradient is taken in z-space): "
                             "use projected=False")
        if auto is not None:
            raise ValueError("use autoguidance or reward guidance, not both at once")


def noise_width(model_config, projected: bool = False, auto: AutoGuidance | None = None) -> int:
    """The last dimension of z0: K (dense), d (projected), or d_S + d_W (projected autoguidance
    by a weak model of another architecture)."""
    cfg = model_lib.resolve_config(model_config)
    if not projected:
        return cfg.vocab_size
    if auto is None:
        return cfg.hidden_size
    return cfg.hidden_size + model_lib.resolve_config(auto.weak_config).hidden_size


def initial_noise(rng: jax.Array, num: int, seq_len: int, model_config, projected: bool = False,
                  auto: AutoGuidance | None = None) -> jax.Array:
    """z₀ ~ N(0, I) of shape (num, L, K), or ε̃ (num, L, d) for the projected samplers (SPEC §10)
    (d_S + d_W with projected autoguidance, `noise_width`)."""
    return jax.random.normal(rng, (num, seq_len, noise_width(model_config, projected, auto)), jnp.float32)


def _denoiser(params, config, projected, auto, weak_params) -> Denoiser:
    if auto is None:
        return network_denoiser(params, config, projected)
    return autoguided_denoiser(params, config, weak_params, auto, projected)


@functools.partial(jax.jit, static_argnames=("config", "num_steps", "projected", "auto", "reward"))
def _flm_sample(params, config, z0, num_steps, projected, auto=None, weak_params=None, reward=None):
    tau, t = (jnp.asarray(a, jnp.float32) for a in flm_time_grid(config.vocab_size, num_steps))
    den = _denoiser(params, config, projected, auto, weak_params)
    state0 = _start(params, z0, projected, weak_params if auto is not None else None)
    return euler_loop(den, state0, tau, t, num_steps, reward)


def flm_sample(params, config, z0: jax.Array, num_steps: int, projected: bool = False, *,
               auto: AutoGuidance | None = None, weak_params=None,
               reward: RewardGuidance | None = None) -> jax.Array:
    """FLM Euler sampler (SPEC §6): token ids (B, L), deterministic given z0.

    For i < N−1: z ← z + (t_{i+1} − t_i)·(D_{τ_i}(z) − z)/(1 − t_i + 1e-5); then
    argmax D_{τ_{N−1}}(z). N network evaluations. projected: z0 is ε̃ (`initial_noise`) and the
    loop carries h = z·E (SPEC §10); equal in distribution, not sample by sample. auto /
    reward: guidance (SPEC §11, `AutoGuidance`, `RewardGuidance`).
    """
    _check_guidance(config, auto, weak_params, reward, projected)
    frozen = _check(config, z0, num_steps, projected, noise_width(config, projected, auto))
    if auto is not None:
        auto = dataclasses.replace(auto, weak_config=ml_collections.FrozenConfigDict(
            model_lib.resolve_config(auto.weak_config)), eta=float(auto.eta))
    return _flm_sample(params, frozen, jnp.asarray(z0), int(num_steps), bool(projected), auto, weak_params,
                       reward)


@functools.partial(jax.jit, static_argnames=("config", "num_steps", "gamma", "projected", "auto", "reward"))
def _fmlm_sample(params, config, z0, rng, num_steps, gamma, projected, auto=None, weak_params=None,
                 reward=None):
    grid = fmlm_time_grid(config.vocab_size, num_steps, gamma)
    den = _denoiser(params, config, projected, auto, weak_params)
    state0 = _start(params, z0, projected, weak_params if auto is not None else None)
    return gamma_loop(den, state0, grid, gamma, rng, reward)


def fmlm_sample(params, config, z0: jax.Array, num_steps: int, gamma: float = 0.0,
                rng: jax.Array | None = None, projected: bool = False, *, auto: AutoGuidance | None = None,
                weak_params=None, reward: RewardGuidance | None = None) -> jax.Array:
    """FMLM γ-sampler (SPEC §6): token ids (B, L) from a two-time model.

    N network evaluations; one step is argmax δ_{0,1}(z0). γ ∈ [0, 1] re-injects noise
    between steps (reference evaluation: 0.8 on LM1B, 1.0 on OWT) and then needs `rng`.
    projected: z0 is ε̃ and the loop carries h = z·E (SPEC §10). auto / reward: guidance
    (SPEC §11; for FMLM, autoguidance B1 and FMRG-J).
    """
    _check_guidance(config, auto, weak_params, reward, projected)
    frozen = _check(config, z0, num_steps, projected, noise_width(config, projected, auto))
    if not frozen.two_time:
        raise ValueError("fmlm_sample needs a two-time model (two_time=True); use flm_sample "
                         "for an FLM")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    if gamma > 0.0 and num_steps > 1 and rng is None:
        raise ValueError("gamma > 0 draws fresh noise between steps: pass rng=jax.random.key(...)")
    rng = jax.random.key(0) if rng is None else rng  # unused when no noise is drawn
    if auto is not None:
        auto = dataclasses.replace(auto, weak_config=ml_collections.FrozenConfigDict(
            model_lib.resolve_config(auto.weak_config)), eta=float(auto.eta))
    return _fmlm_sample(params, frozen, jnp.asarray(z0), rng, int(num_steps), float(gamma),
                        bool(projected), auto, weak_params, reward)


def generate(params, model_config, z0: jax.Array, num_steps: int, *, gamma: float = 0.0,
             rng: jax.Array | None = None, projected: bool = False, auto: AutoGuidance | None = None,
             weak_params=None, reward: RewardGuidance | None = None) -> jax.Array:
    """Token ids (B, L) from the sampler the model calls for (SPEC §6): the FMLM γ-sampler for
    a two-time model, FLM Euler for a one-time one (which has no γ); optionally guided
    (SPEC §11). z0 from `initial_noise`."""
    guidance = dict(auto=auto, weak_params=weak_params, reward=reward)
    if model_lib.resolve_config(model_config).two_time:
        return fmlm_sample(params, model_config, z0, num_steps, gamma, rng, projected, **guidance)
    if gamma != 0.0:
        raise ValueError(f"gamma={gamma} applies to FMLM (two-time) models only; this is an FLM "
                         "(Euler sampler): use gamma=0")
    return flm_sample(params, model_config, z0, num_steps, projected, **guidance)


def sampler_name(model_config) -> str:
    """'fmlm' (γ-sampler) for a two-time model, 'flm' (Euler) otherwise."""
    return "fmlm" if model_lib.resolve_config(model_config).two_time else "flm"
