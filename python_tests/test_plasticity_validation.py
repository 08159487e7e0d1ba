"""Bad input to the plasticity and competition ops, and to the rule and state
dataclasses, is a ValueError/TypeError that names the op, the argument, the
expected and the received value (STYLE rule 3)."""
import math

import pytest
import torch

import cellkern as ck

D, H, W, B = 3, 4, 5, 2
DIMS = (D, H, W)
CELLS = r"with \(D, H, W\) = \(3, 4, 5\)"
STDP_KW = dict(a_plus=0.1, a_minus=0.1, tau_plus=5.0, tau_minus=5.0)


def good():
    """Valid inputs: w, z/y, x_pre, x_post, theta, state."""
    w = torch.rand(26, D, H, W)
    y = torch.rand(B, D, H, W)
    state = ck.PlasticityState.create(DIMS, batch=B)
    return w, y, state


def stdp(w=None, z=None, x_pre=None, x_post=None, **kw):
    w0, y0, st = good()
    args = dict(STDP_KW)
    args.update(kw)
    return ck.ops.stdp_(w0 if w is None else w, y0 if z is None else z, st.x_pre if x_pre is None else x_pre,
                        st.x_post if x_post is None else x_post, **args)


def bcm(w=None, y=None, theta=None, **kw):
    w0, y0, st = good()
    args = dict(lr=0.1, tau_theta=10.0)
    args.update(kw)
    return ck.ops.bcm_(w0 if w is None else w, y0 if y is None else y, st.theta if theta is None else theta, **args)


def step(w=None, y=None, state=None, rule=None, **kw):
    w0, y0, st = good()
    return ck.ops.plasticity_step_(w0 if w is None else w, y0 if y is None else y, st if state is None else state,
                                   ck.PlasticityRule() if rule is None else rule, **kw)


def normalize(w=None, target=None, **kw):
    w0, _, _ = good()
    return ck.ops.heterosynaptic_normalize_(w0 if w is None else w, torch.ones(DIMS) if target is None else target,
                                            **kw)


def call(op, w=None, **kw):
    return {"stdp_": stdp, "bcm_": bcm, "plasticity_step_": step, "heterosynaptic_normalize_": normalize}[op](w, **kw)


WEIGHT_OPS = ["stdp_", "bcm_", "plasticity_step_", "heterosynaptic_normalize_"]


@pytest.mark.parametrize("op", WEIGHT_OPS)
def test_weight_shape_and_K(op):
    w, _, _ = good()
    with pytest.raises(ValueError, match=rf"{op}: w must have shape \(K, D, H, W\) with K = 26, got \(6, 3, 4, 5\)"):
        call(op, w[:6])
    with pytest.raises(ValueError, match=rf"{op}: w must have shape \(K, D, H, W\) with K = 6, got \(26, 3, 4, 5\)"):
        call(op, w, stencil="von_neumann")
    with pytest.raises(ValueError, match=rf"{op}: w must have shape \(K, D, H, W\) with K = 26, got \(26, 60\)"):
        call(op, w.reshape(26, 60))
    with pytest.raises(ValueError, match=rf"{op}: w must have no empty dim, got shape \(26, 0, 4, 5\)"):
        call(op, w[:, :0])


@pytest.mark.parametrize("op", WEIGHT_OPS)
def test_weight_type_and_dtype(op):
    w, _, _ = good()
    with pytest.raises(TypeError, match=rf"{op}: w must be a torch.Tensor, got list"):
        call(op, w.tolist())
    with pytest.raises(TypeError, match=rf"{op}: w must be float16, bfloat16, float32 or float64, got torch.int32"):
        call(op, w.int())


@pytest.mark.parametrize("op", WEIGHT_OPS)
def test_mask(op):
    w, _, _ = good()
    with pytest.raises(TypeError, match=rf"{op}: mask must be a bool tensor \(False = pruned\), got torch.float32"):
        call(op, mask=torch.ones_like(w))
    with pytest.raises(ValueError, match=rf"{op}: mask must have shape \(K, D, H, W\) = \(26, 3, 4, 5\), got \(26, 3, 4, 4\)"):
        call(op, mask=torch.ones(26, 3, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=rf"{op}: mask must be a torch.Tensor, got list"):
        call(op, mask=[True])
    with pytest.raises(ValueError, match=rf"{op}: mask must be on the device of w \(cpu\), got meta"):
        call(op, mask=torch.ones(26, D, H, W, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("op", WEIGHT_OPS)
def test_stencil_boundary_and_backend_names(op):
    with pytest.raises(ValueError, match=rf"{op}: stencil: expected one of von_neumann, moore18, moore, radius\(r\), got 'hex'"):
        call(op, stencil="hex")
    with pytest.raises(ValueError, match=rf"{op}: boundary: expected 'periodic', 'zero' or a 3-tuple .*, got 'mirror'"):
        call(op, boundary="mirror")
    with pytest.raises(ValueError, match=rf"{op}: boundary\[y\]: expected 'periodic' or 'zero', got 'open'"):
        call(op, boundary=("zero", "open", "zero"))
    with pytest.raises(ValueError, match=rf"{op}: backend must be one of reference, cpu, triton, cuda or None, got 'bogus'"):
        call(op, backend="bogus")
    with pytest.raises(TypeError, match=rf"{op}: backend must be a string or None, got int"):
        call(op, backend=3)


# ---- stdp_ ----

def test_stdp_per_cell_shapes():
    _, y, _ = good()
    with pytest.raises(ValueError, match=rf"stdp_: z must have shape \(2, D, H, W\) {CELLS}, got \(1, 3, 4, 5\)"):
        stdp(z=y[:1])
    with pytest.raises(ValueError, match=rf"stdp_: x_post must have shape \(2, D, H, W\) {CELLS}, got \(3, 3, 4, 5\)"):
        stdp(x_post=torch.zeros(3, D, H, W))
    with pytest.raises(ValueError, match=rf"stdp_: x_pre must have shape \(B, D, H, W\) {CELLS}, got \(2, 3, 4, 4\)"):
        stdp(x_pre=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=rf"stdp_: x_pre must have shape \(B, D, H, W\) {CELLS}, got \(3, 4, 5\)"):
        stdp(x_pre=torch.zeros(DIMS))
    with pytest.raises(ValueError, match=r"stdp_: x_pre must have a batch of at least 1, got shape \(0, 3, 4, 5\)"):
        stdp(x_pre=torch.zeros(0, D, H, W), x_post=torch.zeros(0, D, H, W), z=y[:0])
    with pytest.raises(ValueError, match=rf"stdp_: gate must have shape \(2, D, H, W\) {CELLS}, got \(2, 4, 5\)"):
        stdp(gate=y[:, 0])


def test_stdp_dtypes_and_types():
    _, y, st = good()
    with pytest.raises(TypeError, match=r"stdp_: z must be float16, bfloat16, float32 or float64 or bool, got torch.int32"):
        stdp(z=y.int())
    with pytest.raises(TypeError, match=r"stdp_: x_post must have the dtype of x_pre \(torch.float32\), got torch.float64"):
        stdp(x_post=st.x_post.double())
    with pytest.raises(TypeError, match=r"stdp_: x_pre must be float16, bfloat16, float32 or float64, got torch.int64"):
        stdp(x_pre=st.x_pre.long())
    with pytest.raises(TypeError, match=r"stdp_: x_pre must be a torch.Tensor, got list"):
        stdp(x_pre=st.x_pre.tolist())
    with pytest.raises(TypeError, match=r"stdp_: z must be a torch.Tensor, got float"):
        stdp(z=1.0)
    with pytest.raises(TypeError, match=r"stdp_: gate must be float16, bfloat16, float32 or float64 or bool, got torch.uint8"):
        stdp(gate=torch.ones(B, D, H, W, dtype=torch.uint8))


def test_stdp_devices():
    _, y, st = good()
    with pytest.raises(ValueError, match=r"stdp_: x_post must be on the device of w \(cpu\), got meta"):
        stdp(x_post=st.x_post.to("meta"))
    with pytest.raises(ValueError, match=r"stdp_: z must be on the device of w \(cpu\), got meta"):
        stdp(z=y.to("meta"))


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(tau_plus=-1.0), ValueError, r"tau_plus must be > 0, got -1.0"),
    (dict(tau_minus=0), ValueError, r"tau_minus must be > 0, got 0"),
    (dict(tau_plus=math.inf), ValueError, r"tau_plus must be a finite number, got inf"),
    (dict(dt=0.0), ValueError, r"dt must be > 0, got 0.0"),
    (dict(lr=math.nan), ValueError, r"lr must be a finite number, got nan"),
    (dict(a_plus=math.nan), ValueError, r"a_plus must be a finite number, got nan"),
    (dict(a_minus="0.1"), TypeError, r"a_minus must be a real number, got str '0.1'"),
    (dict(a_plus=True), TypeError, r"a_plus must be a real number, got bool True"),
    (dict(lr=torch.tensor(0.1)), TypeError, r"lr must be a real number, got Tensor"),
    (dict(w_min=1.0, w_max=0.0), ValueError, r"w_min must be <= w_max, got w_min=1.0 > w_max=0.0"),
    (dict(w_min=math.nan), ValueError, r"w_min must be a finite number, got nan"),
    (dict(w_max=math.inf), ValueError, r"w_max must be a finite number, got inf"),
    (dict(weight_dependence="hebbian"), ValueError,
     r"weight_dependence must be one of additive, multiplicative, got 'hebbian'"),
    (dict(weight_dependence=1), TypeError, r"weight_dependence must be one of additive, multiplicative, got int 1"),
])
def test_stdp_scalars(kw, exc, msg):
    with pytest.raises(exc, match=f"stdp_: {msg}"):
        stdp(**kw)


# ---- bcm_ ----

def test_bcm_shapes_dtypes_devices():
    _, y, st = good()
    with pytest.raises(ValueError, match=r"bcm_: theta must have shape \(D, H, W\) = \(3, 4, 5\), got \(4, 5\)"):
        bcm(theta=st.theta[0])
    with pytest.raises(ValueError, match=r"bcm_: theta must have shape \(D, H, W\) = \(3, 4, 5\), got \(1, 3, 4, 5\)"):
        bcm(theta=st.theta[None])
    with pytest.raises(ValueError, match=rf"bcm_: y must have shape \(B, D, H, W\) {CELLS}, got \(2, 3, 5, 4\)"):
        bcm(y=y.transpose(2, 3))
    with pytest.raises(ValueError, match=rf"bcm_: gate must have shape \(2, D, H, W\) {CELLS}, got \(1, 3, 4, 5\)"):
        bcm(gate=y[:1] > 0.5)
    with pytest.raises(TypeError, match=r"bcm_: theta must be float16, bfloat16, float32 or float64, got torch.int32"):
        bcm(theta=st.theta.int())
    with pytest.raises(TypeError, match=r"bcm_: y must be float16, bfloat16, float32 or float64, got torch.bool"):
        bcm(y=y > 0.5)
    with pytest.raises(TypeError, match=r"bcm_: y must be a torch.Tensor, got list"):
        bcm(y=y.tolist())
    with pytest.raises(ValueError, match=r"bcm_: theta must be on the device of w \(cpu\), got meta"):
        bcm(theta=st.theta.to("meta"))


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(tau_theta=0.0), ValueError, r"tau_theta must be > 0, got 0.0"),
    (dict(tau_theta=-5), ValueError, r"tau_theta must be > 0, got -5"),
    (dict(lr=math.nan), ValueError, r"lr must be a finite number, got nan"),
    (dict(lr="fast"), TypeError, r"lr must be a real number, got str 'fast'"),
    (dict(decay=-0.1), ValueError, r"decay must be >= 0, got -0.1"),
    (dict(w_min=2.0, w_max=1.0), ValueError, r"w_min must be <= w_max, got w_min=2.0 > w_max=1.0"),
    (dict(theta_min=0.5, theta_max=0.1), ValueError, r"theta_min must be <= theta_max, got theta_min=0.5 > theta_max=0.1"),
    (dict(theta_min=math.nan), ValueError, r"theta_min must be a finite number, got nan"),
])
def test_bcm_scalars(kw, exc, msg):
    with pytest.raises(exc, match=f"bcm_: {msg}"):
        bcm(**kw)


# ---- plasticity_step_ ----

def test_step_rule_and_state_types():
    _, _, st = good()
    with pytest.raises(TypeError, match=r"plasticity_step_: rule must be a cellkern.PlasticityRule, got dict"):
        step(rule={"stdp": None})
    with pytest.raises(TypeError, match=r"plasticity_step_: rule must be a cellkern.PlasticityRule, got STDP"):
        step(rule=ck.STDP())
    with pytest.raises(TypeError, match=r"plasticity_step_: state must be a cellkern.PlasticityState, got tuple"):
        step(state=(st.x_pre, st.x_post, st.theta))


def test_step_state_and_activity_shapes():
    _, y, st = good()
    with pytest.raises(ValueError, match=rf"plasticity_step_: y must have shape \(2, D, H, W\) {CELLS}, got \(3, 3, 4, 5\)"):
        step(y=torch.rand(3, D, H, W))
    with pytest.raises(ValueError, match=rf"plasticity_step_: y must have shape \(2, D, H, W\) {CELLS}, got \(3, 4, 5\)"):
        step(y=y[0])
    bad = ck.PlasticityState(st.x_pre, st.x_post[:1], st.theta)
    with pytest.raises(ValueError, match=rf"plasticity_step_: state.x_post must have shape \(2, D, H, W\) {CELLS}, got \(1, 3, 4, 5\)"):
        step(state=bad)
    bad = ck.PlasticityState(st.x_pre, st.x_post, st.theta[None])
    with pytest.raises(ValueError, match=r"plasticity_step_: state.theta must have shape \(D, H, W\) = \(3, 4, 5\), got \(1, 3, 4, 5\)"):
        step(state=bad)
    other = ck.PlasticityState.create((3, 4, 6), batch=B)
    with pytest.raises(ValueError, match=rf"plasticity_step_: state.x_pre must have shape \(B, D, H, W\) {CELLS}, got \(2, 3, 4, 6\)"):
        step(state=other)
    with pytest.raises(ValueError, match=rf"plasticity_step_: gate must have shape \(2, D, H, W\) {CELLS}, got \(2, 3, 4\)"):
        step(gate=y[..., 0])


def test_step_dtypes():
    _, y, st = good()
    with pytest.raises(TypeError, match=r"plasticity_step_: state.theta must have the dtype of state.x_pre \(torch.float32\), got torch.float64"):
        step(state=ck.PlasticityState(st.x_pre, st.x_post, st.theta.double()))
    with pytest.raises(TypeError, match=r"plasticity_step_: state.x_post must have the dtype of state.x_pre \(torch.float32\), got torch.bfloat16"):
        step(state=ck.PlasticityState(st.x_pre, st.x_post.bfloat16(), st.theta))
    with pytest.raises(TypeError, match=r"plasticity_step_: y must be float16, bfloat16, float32 or float64, got torch.int64"):
        step(y=y.long())
    with pytest.raises(TypeError, match=r"plasticity_step_: state.x_pre must be float16, bfloat16, float32 or float64, got torch.int32"):
        step(state=ck.PlasticityState(st.x_pre.int(), st.x_post, st.theta))
    with pytest.raises(TypeError, match=r"plasticity_step_: state.x_pre must be a torch.Tensor, got NoneType"):
        step(state=ck.PlasticityState(None, st.x_post, st.theta))
    with pytest.raises(ValueError, match=r"plasticity_step_: y must be on the device of w \(cpu\), got meta"):
        step(y=y.to("meta"))


def test_step_lr_scale_and_threshold():
    with pytest.raises(ValueError, match=r"plasticity_step_: lr_scale must have shape \(D, H, W\) = \(3, 4, 5\), got \(3, 4\)"):
        step(lr_scale=torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"plasticity_step_: lr_scale must have shape \(D, H, W\) = \(3, 4, 5\), got \(2, 3, 4, 5\)"):
        step(lr_scale=torch.ones(B, D, H, W))
    with pytest.raises(TypeError, match=r"plasticity_step_: lr_scale must be float16, bfloat16, float32 or float64, got torch.int64"):
        step(lr_scale=torch.ones(DIMS, dtype=torch.long))
    with pytest.raises(TypeError, match=r"plasticity_step_: lr_scale must be a number or a \(D, H, W\) tensor, got str"):
        step(lr_scale="0.5")
    with pytest.raises(TypeError, match=r"plasticity_step_: lr_scale must be a number or a \(D, H, W\) tensor, got bool"):
        step(lr_scale=True)
    with pytest.raises(ValueError, match=r"plasticity_step_: lr_scale must be a finite number, got nan"):
        step(lr_scale=math.nan)
    with pytest.raises(ValueError, match=r"plasticity_step_: lr_scale must be on the device of w \(cpu\), got meta"):
        step(lr_scale=torch.ones(DIMS, device="meta"))
    with pytest.raises(ValueError, match=r"plasticity_step_: activity_threshold must be a finite number, got inf"):
        step(activity_threshold=math.inf)
    with pytest.raises(TypeError, match=r"plasticity_step_: activity_threshold must be a real number, got str 'low'"):
        step(activity_threshold="low")


# ---- heterosynaptic_normalize_ and synapse_l1 ----

def test_normalize_arguments():
    with pytest.raises(ValueError, match=r"heterosynaptic_normalize_: target must have shape \(D, H, W\) = \(3, 4, 5\), got \(4, 5\)"):
        normalize(target=torch.ones(4, 5))
    with pytest.raises(TypeError, match=r"heterosynaptic_normalize_: target must be float16, bfloat16, float32 or float64, got torch.int64"):
        normalize(target=torch.ones(DIMS, dtype=torch.long))
    with pytest.raises(TypeError, match=r"heterosynaptic_normalize_: target must be a torch.Tensor, got float"):
        normalize(target=1.0)
    with pytest.raises(TypeError, match=r"heterosynaptic_normalize_: where must be a bool tensor, got torch.float32"):
        normalize(where=torch.ones(DIMS))
    with pytest.raises(ValueError, match=r"heterosynaptic_normalize_: where must have shape \(D, H, W\) = \(3, 4, 5\), got \(1, 3, 4, 5\)"):
        normalize(where=torch.ones(1, D, H, W, dtype=torch.bool))


def test_synapse_l1_arguments():
    w, _, _ = good()
    with pytest.raises(ValueError, match=r"synapse_l1: w must have shape \(K, D, H, W\) with K = 18, got \(26, 3, 4, 5\)"):
        ck.ops.synapse_l1(w, stencil="moore18")
    with pytest.raises(TypeError, match=r"synapse_l1: mask must be a bool tensor \(False = pruned\), got torch.int64"):
        ck.ops.synapse_l1(w, torch.ones(26, D, H, W, dtype=torch.long))


# ---- competition and activity ----

@pytest.mark.parametrize("op", ["lateral_inhibition", "local_winners"])
def test_competition_arguments(op):
    _, y, _ = good()

    def run(y=y, **kw):
        if op == "lateral_inhibition":
            return ck.ops.lateral_inhibition(y, beta=kw.pop("beta", 0.5), **kw)
        return ck.ops.local_winners(y, kw.pop("threshold", 0.1), **kw)

    with pytest.raises(ValueError, match=rf"{op}: y must have shape \(B, D, H, W\) \(4 dims\), got \(3, 4, 5\)"):
        run(y[0])
    with pytest.raises(TypeError, match=rf"{op}: y must be float16, bfloat16, float32 or float64, got torch.int32"):
        run(y.int())
    with pytest.raises(TypeError, match=rf"{op}: y must be a torch.Tensor, got list"):
        run(y.tolist())
    with pytest.raises(ValueError, match=rf"{op}: y must have no empty dim, got shape \(0, 3, 4, 5\)"):
        run(y[:0])
    with pytest.raises(ValueError, match=rf"{op}: stencil: expected one of .*, got 'hex'"):
        run(stencil="hex")
    with pytest.raises(ValueError, match=rf"{op}: boundary: expected 'periodic', 'zero' or a 3-tuple .*, got 'mirror'"):
        run(boundary="mirror")
    with pytest.raises(ValueError, match=rf"{op}: backend must be one of reference, cpu, triton, cuda or None, got 'gpu'"):
        run(backend="gpu")
    if op == "lateral_inhibition":
        with pytest.raises(ValueError, match=r"lateral_inhibition: beta must be >= 0, got -0.5"):
            run(beta=-0.5)
        with pytest.raises(ValueError, match=r"lateral_inhibition: beta must be a finite number, got nan"):
            run(beta=math.nan)
    else:
        with pytest.raises(TypeError, match=r"local_winners: threshold must be a real number, got str 'a'"):
            run(threshold="a")
        with pytest.raises(ValueError, match=r"local_winners: threshold must be a finite number, got nan"):
            run(threshold=math.nan)


def test_activity_arguments():
    s = torch.rand(2, 3, D, H, W)
    with pytest.raises(ValueError, match=r"activity: s must have shape \(B, C, D, H, W\) \(5 dims\), got \(3, 3, 4, 5\) \(4 dims\)"):
        ck.ops.activity(s[0], s[0])
    with pytest.raises(ValueError, match=r"activity: s_prev must have the shape of s \(2, 3, 3, 4, 5\), got \(2, 2, 3, 4, 5\)"):
        ck.ops.activity(s[:, :2], s)
    with pytest.raises(TypeError, match=r"activity: s_prev must have the dtype of s \(torch.float32\), got torch.float64"):
        ck.ops.activity(s.double(), s)
    with pytest.raises(TypeError, match=r"activity: s_prev must be a torch.Tensor, got NoneType"):
        ck.ops.activity(None, s)
    with pytest.raises(TypeError, match=r"activity: s must be float16, bfloat16, float32 or float64, got torch.int64"):
        ck.ops.activity(s.long(), s.long())
    with pytest.raises(ValueError, match=r"activity: mode must be one of change, state, got 'delta'"):
        ck.ops.activity(s, s, mode="delta")


# ---- the rule and state dataclasses ----

@pytest.mark.parametrize("make,exc,msg", [
    (lambda: ck.STDP(tau_plus=0), ValueError, r"STDP: tau_plus must be > 0, got 0"),
    (lambda: ck.STDP(tau_minus=-2.0), ValueError, r"STDP: tau_minus must be > 0, got -2.0"),
    (lambda: ck.STDP(lr=math.nan), ValueError, r"STDP: lr must be a finite number, got nan"),
    (lambda: ck.STDP(a_plus="big"), TypeError, r"STDP: a_plus must be a real number, got str 'big'"),
    (lambda: ck.STDP(weight_dependence="soft"), ValueError,
     r"STDP: weight_dependence must be one of additive, multiplicative, got 'soft'"),
    (lambda: ck.BCM(tau_theta=0), ValueError, r"BCM: tau_theta must be > 0, got 0"),
    (lambda: ck.BCM(decay=-1e-3), ValueError, r"BCM: decay must be >= 0, got -0.001"),
    (lambda: ck.BCM(lr=math.inf), ValueError, r"BCM: lr must be a finite number, got inf"),
    (lambda: ck.BCM(theta_min=0.6, theta_max=0.5), ValueError, r"BCM: theta_min must be <= theta_max, got 0.6 > 0.5"),
    (lambda: ck.BCM(theta_max=math.nan), ValueError, r"BCM: theta_max must be a finite number, got nan"),
    (lambda: ck.Competition(beta=-1), ValueError, r"Competition: beta must be >= 0, got -1"),
    (lambda: ck.Competition(beta="a"), TypeError, r"Competition: beta must be a real number, got str 'a'"),
    (lambda: ck.PlasticityRule(stdp=ck.BCM()), TypeError, r"PlasticityRule: stdp must be a STDP or None, got BCM"),
    (lambda: ck.PlasticityRule(bcm={}), TypeError, r"PlasticityRule: bcm must be a BCM or None, got dict"),
    (lambda: ck.PlasticityRule(competition=0.5), TypeError,
     r"PlasticityRule: competition must be a Competition or None, got float"),
    (lambda: ck.PlasticityRule(normalize=1), TypeError, r"PlasticityRule: normalize must be a bool, got int"),
    (lambda: ck.PlasticityRule(w_min=2, w_max=1), ValueError, r"PlasticityRule: w_min must be <= w_max, got 2.0 > 1.0"),
    (lambda: ck.PlasticityRule(dt=0), ValueError, r"PlasticityRule: dt must be > 0, got 0"),
    (lambda: ck.PlasticityRule(activity_threshold=math.inf), ValueError,
     r"PlasticityRule: activity_threshold must be a finite number, got inf"),
    (lambda: ck.PlasticityRule(w_max=None), TypeError, r"PlasticityRule: w_max must be a real number, got NoneType"),
    (lambda: ck.PlasticityRule().params(lr_scale=math.nan), ValueError,
     r"PlasticityRule.params: lr_scale must be a finite number, got nan"),
    (lambda: ck.PlasticityState.create((3, 4)), ValueError,
     r"PlasticityState.create: dims must be 3 positive ints \(D, H, W\), got \(3, 4\)"),
    (lambda: ck.PlasticityState.create((3, 0, 4)), ValueError,
     r"PlasticityState.create: dims must be 3 positive ints \(D, H, W\), got \(3, 0, 4\)"),
    (lambda: ck.PlasticityState.create((3, 4, 5), batch=0), ValueError,
     r"PlasticityState.create: batch must be a positive int, got 0"),
    (lambda: ck.PlasticityState.create((3, 4, 5), batch=2.0), ValueError,
     r"PlasticityState.create: batch must be a positive int, got 2.0"),
    (lambda: ck.PlasticityState.create((3, 4, 5), theta0=0.0), ValueError,
     r"PlasticityState.create: theta0 must be > 0, got 0.0"),
    (lambda: ck.PlasticityState.create((3, 4, 5), dtype=torch.int32), TypeError,
     r"PlasticityState.create: dtype must be a floating torch.dtype, got torch.int32"),
])
def test_rule_and_state_arguments(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


def test_good_inputs_pass():
    """The inputs the tests above spoil are valid as they are, so each error
    comes from the spoiled argument alone."""
    _, y, _ = good()
    ref = dict(backend="reference")
    stdp(**ref)
    stdp(z=y > 0.5, gate=y > 0.2, weight_dependence="Multiplicative ", **ref)
    bcm(gate=y, **ref)
    step(**ref)
    step(lr_scale=torch.ones(DIMS), gate=y > 0.1, activity_threshold=0.2, **ref)
    normalize(where=torch.ones(DIMS, dtype=torch.bool), **ref)
    ck.ops.lateral_inhibition(y, beta=0.5, **ref)
    ck.ops.local_winners(y, 0.1, **ref)
    ck.ops.activity(torch.rand(2, 3, D, H, W), torch.rand(2, 3, D, H, W))
    ck.PlasticityState.create(torch.Size(DIMS), batch=3, theta0=0.2, dtype=torch.float64)
