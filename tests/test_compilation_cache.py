"""The persistent compilation cache's switch: "none" turns it off from the config or from the environment."""

import os

import pytest

from resnext_jax import compilation_cache


@pytest.mark.parametrize("config_value, env_value", [("none", None), ("", "none"), (None, "NONE")])
def test_none_turns_the_cache_off_and_creates_nothing(monkeypatch, tmp_path, config_value, env_value):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # the suite's shared cache would win
  if env_value is None:
    monkeypatch.delenv(compilation_cache.ENV_DIR, raising=False)
  else:
    monkeypatch.setenv(compilation_cache.ENV_DIR, env_value)
  monkeypatch.chdir(tmp_path)
  assert compilation_cache.enable(config_value) is None
  assert not os.listdir(tmp_path)  # no directory called 'none' beside the job
