"""The Colab notebooks (colabs/*.ipynb): committed without outputs, and run end to end in reduced mode.

Reduced mode (FLOWSEG_COLAB_REDUCED=1) keeps every code path of a notebook and shrinks steps and sizes.
Each notebook runs in a fresh IPython kernel of this interpreter. The kernelspec is written to a temporary
directory, so a fresh venv with only `pip install -e .[torch,dev]` works. Each notebook saves its figures
as PNGs (FLOWSEG_COLAB_FIGURES), which the test opens. A check cell appended to the executed copy asserts
on what the notebook computed.

`execute_notebook` is also the way to run a notebook by hand in full mode, e.g.
  python -c "from tests.colabs_test import execute_notebook as e; e('vector_field', '/tmp/f', reduced=False)"
"""

from __future__ import annotations

import os
import re
import sys
import time
import zipfile

import nbformat
import numpy as np
import pytest
from ipykernel import kernelspec
from nbclient import NotebookClient
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
KERNEL_NAME = "flowseg-colab-test"
NOTEBOOKS = ("flowseg_demo", "vector_field", "convert_and_finetune", "prompted_demo")

# The figures each notebook must draw (saved as FIGURE_DIR/<name>.png by its `show` helper).
FIGURES = {
  "flowseg_demo": ("training_log", "segmentations", "trajectory", "miou_vs_steps"),
  "vector_field": ("centroids", "fields", "grad_norm_profile", "convergence"),
  "convert_and_finetune": ("finetune", "finetune_pictures"),
  "prompted_demo": ("training_log", "prompts", "steps"),
}

# Appended to the executed copy: asserts on the notebook's own variables. Reduced mode trains
# REDUCED_STEPS tiny steps on 4 classes, enough for checks that an untrained or broken pipeline fails:
# the loss falls, and the held-out pixel accuracy beats chance (1/4) by a margin. (An untrained PixNerd
# outputs v = 0: its x(1) is the image, whose random colours decode at chance.)
CHECKS = {
  "prompted_demo": """
assert REDUCED and restored_step == config.total_steps == 6, restored_step
assert len(masks) == len(prompts) >= 1
for m in masks:
  assert m.shape == label.shape and set(np.unique(m)) <= {0, 1}, m.shape
# prompt= by text and by id agree; an unknown prompt is refused.
np.testing.assert_array_equal(seg(image, prompt=present[0]), masks[0])
try:
  seg(image, prompt="a photo of a cat")
  raise AssertionError("unknown prompt accepted")
except ValueError:
  pass
assert sorted(by_steps) == STEP_COUNTS
for r in [*by_steps.values(), adaptive]:
  assert 0.0 <= r["giou"] <= 1.0 and 0.0 <= r["ciou"] <= 1.0, r
  assert r["baseline_ciou"] == 0.0 and r["num_examples"] == by_steps[1]["num_examples"]
  assert 0.0 <= r["wrong_giou"] <= 1.0, r  # the wrong-prompt score is part of every evaluation
cfg = config.prompted.adaptive
assert cfg.dt_min <= adaptive["mean_dt"] <= cfg.dt_max and by_steps[1]["mean_dt"] == 1.0
print("checks passed")
""",
  "flowseg_demo": """
assert REDUCED and config.total_steps == REDUCED_STEPS == restored_step, restored_step
h, w = config.input.image_size
assert trajectory.shape == (NUM_STEPS, NUM_IMAGES, h, w, 3), trajectory.shape
# The trajectory: the first frame is the input image, then one Euler step of the network's velocity
# per frame; the last frame is x(1) and decodes to the labels drawn.
np.testing.assert_array_equal(frames[0], images[:NUM_ROWS])
y = jnp.full((NUM_IMAGES,), task.cond_label, jnp.int32)
v0 = np.asarray(task.model.apply({"params": params}, images, jnp.zeros((NUM_IMAGES,)), y))
assert np.abs(v0).max() > 1e-2, np.abs(v0).max()
np.testing.assert_allclose(trajectory[0], images + (times[1] - times[0]) * v0, rtol=1e-4, atol=1e-4)
np.testing.assert_array_equal(trajectory[-1], x1)
np.testing.assert_array_equal(np.asarray(centroids_lib.decode_colours(trajectory[-1], real_centroids)), pred)
assert np.all(np.diff(remaining) < 0), remaining  # every step gets closer to the end point
# Trained, not only run: the loss fell, and held-out pixels are right well above chance.
print("reduced-mode scores:", {n: (s["mIoU"], s["aAcc"]) for n, s in scores_by_steps.items()})
assert loss_end < 0.85 * loss_start, (loss_start, loss_end)
assert decode_end > decode_start + 2, (decode_start, decode_end)
assert scores_by_steps[NUM_STEPS]["aAcc"] > 1 / num_classes + 0.05, scores_by_steps[NUM_STEPS]
assert sorted(miou_by_steps) == sorted(STEP_COUNTS), miou_by_steps
assert all(0.0 <= v <= 1.0 for v in miou_by_steps.values()), miou_by_steps
print("checks passed")
""",
  "vector_field": """
assert REDUCED
assert np.all(np.isfinite(e2)) and abs(e1 @ e2) < 1e-5, (e1, e2)
assert np.all(np.isfinite(fields(plane(np.array([0.3 * D]), np.array([0.2 * D])))[1]))
kron, rand = centroid_spread[12]
assert kron > rand, centroid_spread
at_centroid = fields(mu[a][None])
np.testing.assert_allclose(at_centroid[0], 0.0, atol=1e-6)
assert np.linalg.norm(at_centroid[1]) < 1e-3, at_centroid[1]  # -grad Phi vanishes on the own centroid
assert in_plane(c)[2] < 1e-6 and in_plane(b)[2] < 1e-6  # the plane holds mu_a, mu_b and mu_c
assert 0.0 < boundary < D, (boundary, D)
assert stiffness > 3, stiffness  # a stiffer spring than vanilla next to the centroid
assert log_norm[i_boundary] > 3 * vanilla[i_boundary], (log_norm[i_boundary], vanilla[i_boundary])
assert log_norm[i_boundary] > log_norm[i_half] > 0, (log_norm[i_half], log_norm[i_boundary])
assert ratio[i_start] > ratio[i_half] > ratio[i_boundary] > 1, ratio[[i_start, i_half, i_boundary]]
assert set(curves) == set(RUNS), curves.keys()
for name, curve in curves.items():
  assert curve["log"][-1]["step"] == REDUCED_STEPS, (name, curve["log"][-1])
  assert curve["evals"] and all(0.0 <= e["mIoU"] <= 1.0 for e in curve["evals"]), curve["evals"]
  print("reduced-mode scores:", name, curve["evals"][-1]["mIoU"], curve["evals"][-1]["aAcc"])
# Trained: FlowSeg's loss fell and its held-out pixel accuracy beats chance.
losses = [m["loss"] for m in curves["FlowSeg (reshaped)"]["log"]]
assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses
assert curves["FlowSeg (reshaped)"]["evals"][-1]["aAcc"] > 1 / num_classes + 0.05, curves
# The vanilla run optimises the plain flow-matching loss; the reshaped one does not.
for m in curves["vanilla flow matching"]["log"]:
  np.testing.assert_allclose(m["loss"], m["fm_loss"], rtol=1e-5)
assert all(abs(m["loss"] - m["fm_loss"]) > 1e-3 * m["fm_loss"] for m in curves["FlowSeg (reshaped)"]["log"])
print("checks passed")
""",
  "convert_and_finetune": """
assert REDUCED
assert round_trip_error == 0.0, round_trip_error
assert converted_model.arch_config() == pixnerd.make_model("tiny/4", num_classes=1000).arch_config()
# The EMA copy was converted, not the online one.
_, converted = pixnerd_convert.load_converted(CONVERTED)
back = pixnerd_convert.flax_to_torch(converted, converted_model)
online = pixnerd_convert.select_weights(pixnerd_convert.read_checkpoint_file(PIXNERD_CKPT), "online")
assert max(float(np.abs(back[k] - online[k].numpy()).max()) for k in back) > 1e-3
assert config.model_init == CONVERTED and result["step"] == config.total_steps == REDUCED_STEPS, result
assert 0.0 <= before["mIoU"] <= 1.0 and 0.0 <= after["mIoU"] <= 1.0, (before["mIoU"], after["mIoU"])
np.testing.assert_allclose(after["mIoU"], result["mIoU"], rtol=1e-6)  # same checkpoint, same score
assert len(rows) == NUM_PICTURES and [b[0] for b, _ in rows] == [a[0] for _, a in rows]
print("reduced-mode scores:", before["mIoU"], before["aAcc"], after["mIoU"], after["aAcc"])
# Fine-tuning trained: the held-out pixel accuracy beats chance, and the converted weights' score.
assert after["aAcc"] > max(1 / num_classes + 0.05, before["aAcc"]), (before["aAcc"], after["aAcc"])
print("checks passed")
""",
}


def install_kernelspec(prefix: str) -> str:
  """Writes a kernelspec that starts this interpreter under `prefix`; returns its JUPYTER_PATH entry."""
  kernelspec.install(kernel_name=KERNEL_NAME, display_name="flowseg test", prefix=prefix)
  return os.path.join(prefix, "share", "jupyter")


def execute_notebook(
  name: str, figure_dir: str, *, reduced: bool = True, timeout: int = 600, jupyter_path: str = ""
) -> tuple[nbformat.NotebookNode, float]:
  """Runs colabs/<name>.ipynb (plus its check cell when reduced) in a fresh kernel.

  Args:
    name: notebook name without `.ipynb`.
    figure_dir: where the notebook saves its figures (FLOWSEG_COLAB_FIGURES); also the kernel's cwd.
    reduced: FLOWSEG_COLAB_REDUCED=1 (and the check cell).
    timeout: seconds allowed per cell.
    jupyter_path: directory holding kernels/<KERNEL_NAME>; empty: install one under figure_dir.

  Returns:
    (the executed notebook, wall seconds). Raises nbclient's CellExecutionError on a failing cell.
  """
  os.makedirs(figure_dir, exist_ok=True)
  if not jupyter_path:
    jupyter_path = install_kernelspec(os.path.join(figure_dir, "kernel"))
  nb = nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)
  if reduced:
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[name].strip()))
  scratch = os.path.join(figure_dir, "tmp")  # the notebooks' tempfile workdirs land here
  os.makedirs(scratch, exist_ok=True)
  env = dict(os.environ)
  env.update(
    TMPDIR=scratch,
    FLOWSEG_COLAB_REDUCED="1" if reduced else "0",
    FLOWSEG_COLAB_FIGURES=figure_dir,
    JUPYTER_PATH=os.pathsep.join(filter(None, [jupyter_path, os.environ.get("JUPYTER_PATH")])),
    MPLBACKEND="module://matplotlib_inline.backend_inline",
  )
  # One device, like a Colab CPU or GPU runtime: 8 fake devices make the tiny programs slower on CI.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  previous = os.environ.get("JUPYTER_PATH")
  os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]  # where the kernel manager looks for the spec
  try:
    client = NotebookClient(
      nb,
      kernel_name=KERNEL_NAME,
      timeout=timeout,
      resources={"metadata": {"path": figure_dir}},
    )
    start = time.time()
    client.execute(env=env)
    seconds = time.time() - start
  finally:
    if previous is None:
      os.environ.pop("JUPYTER_PATH", None)
    else:
      os.environ["JUPYTER_PATH"] = previous
  return nb, seconds


def _outputs(nb, output_type: str):
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == output_type:
        yield out


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
  return install_kernelspec(str(tmp_path_factory.mktemp("kernelspec")))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
  """Valid nbformat 4, no outputs or execution counts, a python3 kernelspec, the shared setup cell."""
  nb = nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)
  nbformat.validate(nb)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, name
  for cell in code:
    assert cell.outputs == [], f"{name}: a cell was committed with outputs:\n{cell.source[:200]}"
    assert cell.execution_count is None, f"{name}: execution count {cell.execution_count}"
  assert "FLOWSEG_GIT_URL" in code[0].source and "FLOWSEG_COLAB_REDUCED" in code[0].source


def test_notebooks_share_setup_and_helpers():
  """The install cell and the helper cell are the same in every notebook (edit them together)."""
  firsts = []
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    firsts.append(tuple(code[:2]))
  assert len(set(firsts)) == 1, "the first two code cells differ between notebooks"


def test_readme_documents_the_knobs():
  with open(os.path.join(COLABS, "README.md")) as f:
    text = f.read()
  for word in ("FLOWSEG_GIT_URL", "FLOWSEG_COLAB_REDUCED", "FLOWSEG_COLAB_FIGURES", *NOTEBOOKS):
    assert word in text, word


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_reduced_mode(name, tmp_path, jupyter_path):
  figure_dir = str(tmp_path / "figures")
  nb, seconds = execute_notebook(name, figure_dir, jupyter_path=jupyter_path)
  print(f"{name}: {seconds:.1f} s", file=sys.stderr)
  errors = [out for out in _outputs(nb, "error")]
  assert not errors, errors
  streams = "".join(out.get("text", "") for out in _outputs(nb, "stream"))
  assert "checks passed" in streams, streams[-2000:]
  shown = [out for out in _outputs(nb, "display_data") if "image/png" in out.get("data", {})]
  assert len(shown) >= len(FIGURES[name]), f"{len(shown)} figures displayed"
  for figure in FIGURES[name]:
    path = os.path.join(figure_dir, f"{figure}.png")
    assert os.path.isfile(path), f"{name} did not draw {figure}"
    with Image.open(path) as image:
      pixels = np.asarray(image.convert("RGB"))
    assert min(pixels.shape[:2]) > 100, (figure, pixels.shape)
    assert pixels.std() > 5, f"{figure} is blank"


def _setup_functions(namespace: dict) -> dict:
  """Runs the shared setup cell's definitions (not its actions) into `namespace`."""
  nb = nbformat.read(os.path.join(COLABS, f"{NOTEBOOKS[0]}.ipynb"), as_version=4)
  source = next(c.source for c in nb.cells if c.cell_type == "code")
  exec(source[: source.index("NOTEBOOK_START =")], namespace)  # noqa: S102 (our own notebook)
  return namespace


def test_setup_cell_states_the_jax_floor_and_silences_tensorflow_first():
  nb = nbformat.read(os.path.join(COLABS, f"{NOTEBOOKS[0]}.ipynb"), as_version=4)
  source = next(c.source for c in nb.cells if c.cell_type == "code")
  with open(os.path.join(REPO, "pyproject.toml")) as f:
    pyproject = f.read()
  floor = source.split('JAX_FLOOR = "')[1].split('"')[0]
  assert floor == "0.7.1", floor  # jax.set_mesh
  required = re.search(r'"jax(?:\[[^]]*\])?>=([0-9.]+)', pyproject).group(1)
  ns = _setup_functions({})
  assert ns["version_tuple"](required) <= ns["version_tuple"](floor), (required, floor)
  first_import = re.search(r"^(import (?!os$)|from )", source, re.M).start()  # os sets the env
  assert source.index("TF_CPP_MIN_LOG_LEVEL") < first_import
  assert source.index("TF_ENABLE_ONEDNN_OPTS") < first_import


def test_setup_cell_unpacks_a_repository_zip_and_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for var in ("FLOWSEG_SOURCE", "FLOWSEG_GIT_URL", "FLOWSEG_REPO"):
    monkeypatch.delenv(var, raising=False)
  ns = _setup_functions({"__name__": "setup_cell"})
  # No source at all: the error lists the three ways to bring the code.
  with pytest.raises(RuntimeError) as e:
    ns["fetch_project"]()
  for words in ("git archive", "Files pane", "FLOWSEG_SOURCE", "FLOWSEG_GIT_URL"):
    assert words in str(e.value), words
  # A GitHub-style zip (one top folder) dropped in the working directory is found and unpacked.
  with zipfile.ZipFile(tmp_path / "flowseg-jax-main.zip", "w") as z:
    z.writestr("flowseg-jax-main/configs/demo.py", "# demo config\n")
    z.writestr("flowseg-jax-main/pyproject.toml", "[project]\n")
  repo = ns["fetch_project"]()
  assert repo == str(tmp_path / "flowseg-jax" / "flowseg-jax-main"), repo
  assert ns["is_checkout"](repo)
  # FLOWSEG_SOURCE naming something that is not the project: a clear error.
  ns["FLOWSEG_SOURCE"] = str(tmp_path / "nothing.zip")
  with pytest.raises(RuntimeError, match="neither a checkout nor a zip"):
    ns["fetch_project"]()
  assert ns["version_tuple"]("0.7.1") >= ns["version_tuple"]("0.7.1.dev20250101+cuda")
