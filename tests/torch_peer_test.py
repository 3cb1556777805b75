"""benchmarks/torch_peer.py: the efficient PyTorch FlowSeg loss against the parity reference, and the
peer step's losses."""

import itertools

import pytest

torch = pytest.importorskip("torch")

from benchmarks import configs, torch_peer  # noqa: E402
from flowseg_jax import train_step  # noqa: E402
from tests.torch_reference import flowseg as reference  # noqa: E402

SWITCHES = list(
  itertools.product(
    ["log", "sqrt", "linear", "norm_reduced"], [1.0, 0.5], ["static", "annealing"], ["v", "x"]
  )
)


def _inputs(dtype, *, b=2, h=16, w=12, n=150, seed=0):
  """Random inputs: network outputs ~N(0, 1) put x1_hat anywhere in and around the colour cube,
  some pixels near a centroid; 10 % of the labels ignored."""
  gen = torch.Generator().manual_seed(seed)
  out = torch.randn(b, 3, h, w, generator=gen, dtype=torch.float64)
  x0 = torch.rand(b, 3, h, w, generator=gen, dtype=torch.float64) * 2 - 1
  labels = torch.randint(0, n, (b, h, w), generator=gen)
  labels[torch.rand(b, h, w, generator=gen) < 0.1] = reference.IGNORE
  t = torch.rand(b, generator=gen, dtype=torch.float64)
  cast = lambda a: a.to(dtype)  # noqa: E731
  return cast(out), cast(x0), labels, cast(t), reference.kronecker_centroids(n, dtype)


@pytest.mark.parametrize("transform,tau,target,prediction", SWITCHES)
@pytest.mark.parametrize("mask_ignored,reshape", [(True, True), (False, True), (True, False)])
def test_flowseg_loss_equals_the_reference_in_float64(
  transform, tau, target, prediction, mask_ignored, reshape
):
  kw = dict(
    transform=transform,
    tau=tau,
    target=target,
    prediction=prediction,
    mask_ignored=mask_ignored,
    reshape=reshape,
    max_grad_norm=0.7,
  )
  out, x0, labels, t, c = _inputs(torch.float64)
  want = reference.flowseg_loss(out, x0, labels, t, c, **kw)
  got = torch_peer.flowseg_loss(out, x0, labels, t, c, **kw)
  for name, a, b in zip(("loss", "grad_phi", "v_target", "v_theta"), got, want):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()), msg=name)


@pytest.mark.parametrize("transform,tau", [("log", 1.0), ("log", 0.5), ("norm_reduced", 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_flowseg_loss_float32_within_1e5_of_the_reference(transform, tau, seed):
  """What the benchmark runs (float32): loss and ∇Φ within 1e-5 (relative; ∇Φ to its largest entry)
  of the reference in float64, as close as the reference itself gets in float32."""
  kw = dict(transform=transform, tau=tau)
  args64 = _inputs(torch.float64, h=32, w=32, seed=seed)
  args32 = [a.float() if a.is_floating_point() else a for a in args64]
  exact = reference.flowseg_loss(*args64, **kw)
  scale = float(exact[1].abs().max())
  for impl in (torch_peer, reference):
    loss, grad_phi, *_ = impl.flowseg_loss(*args32, **kw)
    assert abs(float(loss) - float(exact[0])) <= 1e-5 * float(exact[0])
    assert float((grad_phi.double() - exact[1]).abs().max()) <= 1e-5 * scale


def test_pixel_blocks_do_not_change_the_result():
  out, x0, labels, t, c = _inputs(torch.float64, h=20, w=20)
  lab = labels.clamp(max=c.shape[0] - 1)
  kw = dict(tau=1.0, eps=1e-6, transform="log")
  whole = torch_peer.potential_grad(out, lab, c, block=10**6, **kw)
  for block in (1, 7, 333):
    torch.testing.assert_close(torch_peer.potential_grad(out, lab, c, block=block, **kw), whole)


def test_peer_steps_train_with_each_loss():
  config = configs.case_config(
    configs.load_config("configs/demo.py"), configs.Case("tiny/4", 16, 16, 2), dtype="float32"
  )
  setup = train_step.TrainSetup(config)
  batch = configs.random_batch(config, setup.task.num_classes)
  cpu = torch.device("cpu")
  losses = {}
  for kind in torch_peer.LOSSES:
    step = torch_peer.TorchTrainStep(setup, batch, cpu, bf16=False, loss=kind)
    before = [p.detach().clone() for p in step.params]
    step.run(1)
    losses[kind] = float(step.loss.detach())
    assert any(not torch.equal(a, p) for a, p in zip(before, step.params))
  # Same seed, weights, batch and t: the efficient and the reference FlowSeg losses agree.
  assert losses["flowseg"] == pytest.approx(losses["reference"], rel=1e-5)
  assert losses["mse"] != pytest.approx(losses["flowseg"])
  alone = torch_peer.LossStep(torch_peer.TorchTrainStep(setup, batch, cpu, bf16=False))
  alone.run(2)
  assert alone.out.grad is not None and torch.isfinite(alone.loss)
  with pytest.raises(ValueError, match="loss must be one of"):
    torch_peer.TorchTrainStep(setup, batch, cpu, bf16=False, loss="l1")
