"""The README's Python example runs as written and does what its comments say."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    ns: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), ns)
    # the shapes the comments promise
    assert ns["b"].shape == (1000, 2, 4) and ns["b"].dtype == torch.uint8 and int(ns["b"].max()) < 4
    assert ns["T"].shape == (1000,)
    assert torch.equal(ns["x_hat"], ns["x_hat2"])
    assert ns["blocks"].shape == (64, 8, 4) and ns["pad"] == 2 and ns["w_hat"].shape == (64, 30)
