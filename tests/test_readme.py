"""The README's Python examples run as written (so they cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# every module that registers a Lightning class, imported before an example's registrations are snapshotted
from lightning_cnet import _atomic, _namespace, callbacks, classification, data, segmentation  # noqa: F401
from lightning_cnet.bases import BASES
from lightning_cnet.integrators import SCHEMES
from lightning_cnet.models import MODELS
from lightning_cnet.units import UNITS

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced code blocks tagged ``python``."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


BLOCKS = python_blocks(README.read_text()) if README.is_file() else []


def test_readme_has_the_examples():
    assert len(BLOCKS) >= 3, "README.md must show the Trainer, backbone and manifestation examples"
    joined = "\n".join(BLOCKS)
    for name in ("DepthRefinementCallback", "forward_features", "create_feature_extractor", "compress"):
        assert name in joined


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    assert "assert " in BLOCKS[index], "each README example checks its own result with an assert"
    monkeypatch.chdir(tmp_path)
    for registry in (SCHEMES, BASES, MODELS, UNITS):  # what an example registers is dropped afterwards
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    for table in ("_REGISTRY", "_CONCRETE"):  # the Lightning classes an example registers, too
        monkeypatch.setattr(_namespace, table, dict(getattr(_namespace, table)))
    exec(compile(BLOCKS[index], f"README.md example {index + 1}", "exec"), {"__name__": "__readme__"})
