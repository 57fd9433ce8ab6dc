import os

# Several virtual CPU devices so sharding tests run without a GPU; set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's name: fresh per test, reproducible per name."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def has_gpu() -> bool:
    return any(d.platform == "gpu" for d in jax.devices())
