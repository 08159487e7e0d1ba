"""The README's usage example runs and trains (gradients reach the lattice weights)."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_example_runs_and_backpropagates():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has a python example"
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    model = ns["LatticeClassifier"]()
    img = torch.rand(3, 1, 16, 16)
    logits = model(img)
    assert logits.shape == (3, 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2, 3])).backward()
    assert model.w.grad is not None and model.w.grad.abs().sum() > 0


def test_readme_plasticity_example_runs_and_moves_the_weights():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "plasticity_step_" in b)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    w = ns["w"]
    assert (w != 0.5).any(), "the plasticity example should move some weights"
    assert bool(((w >= 0.1) & (w <= 2.0)).all())
