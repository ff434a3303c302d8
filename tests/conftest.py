"""Every test sees 8 simulated CPU devices (set before jax is imported)."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

SHARED_DATA = os.environ.get(
    "RESTEM_DATA_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))


@pytest.fixture(scope="session")
def shared_data():
  if not os.path.isdir(SHARED_DATA):
    pytest.fail(f"shared data folder not found at {SHARED_DATA} (set RESTEM_DATA_DIR)")
  return SHARED_DATA
