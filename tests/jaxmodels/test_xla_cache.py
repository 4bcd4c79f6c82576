"""The commands' persistent XLA compilation cache: one directory per kind of machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxmodels.xla_cache import MAX_BYTES, machine_key

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
cpu MHz\t\t: 2000.000
flags\t\t: fpu sse2 avx avx2 avx512f

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
cpu MHz\t\t: 3100.000
flags\t\t: fpu sse2 avx avx2 avx512f
"""


def test_machine_key_follows_the_instruction_set_not_the_clock():
    assert machine_key(CPUINFO) == machine_key(CPUINFO.replace("2000.000", "3800.000"))
    assert machine_key(CPUINFO) != machine_key(CPUINFO.replace(" avx512f", ""))  # an older node
    assert machine_key(CPUINFO) != machine_key(CPUINFO.replace("Platinum 8480+", "Gold 6148"))
    assert machine_key() == machine_key()


# A process's first JAX work: compile one small program (cached whatever its compile time).
PROGRAM = """
import jax, jax.numpy as jnp
from jaxmodels.xla_cache import use_compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
print(use_compilation_cache())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum()), len(hits))
print(jax.config.jax_compilation_cache_max_size)
"""


def run_program(tmp_path, **env: str) -> list[str]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("JAX_COMPILATION_CACHE_DIR", "AIRYSORT_XLA_CACHE")}
    environment |= {"XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu", **env}
    run = subprocess.run([sys.executable, "-c", PROGRAM], env=environment, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def entries(directory) -> list[str]:
    return sorted(path.name for path in directory.rglob("*") if path.is_file()) if directory.exists() else []


@pytest.mark.parametrize("setting", ["default", "off", "user directory"])
def test_compiled_programs_are_kept_per_machine_unless_the_user_says_otherwise(tmp_path, setting):
    ours = tmp_path / "cache" / "airysort" / "xla" / machine_key()
    users = tmp_path / "mine"
    env = {"default": {}, "off": {"AIRYSORT_XLA_CACHE": "off"},
           "user directory": {"JAX_COMPILATION_CACHE_DIR": str(users)}}[setting]
    directory, value, hits, max_size = run_program(tmp_path, **env)
    assert hits == "0"
    if setting == "default":
        assert directory == str(ours) and entries(ours)
        assert int(max_size) == MAX_BYTES  # JAX evicts beyond it (with filelock, a dependency)
        # A second process finds the program there: a hit, nothing new written.
        before = entries(ours)
        again, same_value, hits, _ = run_program(tmp_path)
        assert (again, same_value) == (directory, value) and int(hits) > 0 and entries(ours) == before
    else:
        assert directory == "None" and entries(ours) == []
        assert bool(entries(users)) == (setting == "user directory")
