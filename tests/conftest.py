"""Test setup: CPU only, 8 fake devices, fast compiles, and the assets switch."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)


def require_asset(name: str) -> str:
    """Returns the local folder of asset `name`, or skips (fails under FTJAX_REQUIRE_ASSETS=1)."""
    from ftjax import assets

    try:
        return str(assets.fetch(name))
    except assets.AssetError as e:
        if os.environ.get("FTJAX_REQUIRE_ASSETS") == "1":
            pytest.fail(f"asset {name!r} is required here (FTJAX_REQUIRE_ASSETS=1): {e}")
        pytest.skip(f"asset {name!r} cannot be fetched here: {e}")
