"""The README's Python snippets run as written, top to bottom, on a CPU with 8 simulated
devices (what the sharding snippet asks for)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_snippets_for_every_workflow():
    code = "\n".join(readme_snippets())
    needed_calls = ("save_pretrained", "get_tokenizer", "from_hf", "make_mesh", "jit_train_step")
    for needed in (*needed_calls, "generate("):
        assert needed in code, needed


@pytest.mark.slow
def test_readme_snippets_run_top_to_bottom(tmp_path):
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(readme_snippets()))
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(README.parent),
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "layer0/routed_fraction" in done.stdout
    assert (tmp_path / "tiny-qwen3-l2a" / "config.json").exists()
