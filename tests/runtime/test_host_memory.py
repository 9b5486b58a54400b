"""Tests for frcnn_jax/runtime/host_memory.py: freed blocks are reused instead of faulted in again."""

import platform
import subprocess
import sys
import textwrap

import pytest

# A worker thread mallocs, touches and frees a 96 MiB block six times; the minor page faults
# of the last five are counted. glibc serves such a block from a fresh mmap every time unless
# keep_freed_memory() ran first.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from frcnn_jax.runtime import host_memory
    if sys.argv[1] == "keep":
      assert host_memory.keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 96 << 20
    faults = []
    def work():
      for _ in range(6):
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(faults[-1] - faults[1])
""")


def _faults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       check=True)
  return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_freed_blocks_are_reused_without_page_faults():
  pages = 5 * (96 << 20) // 4096
  assert _faults("default") >= 0.9 * pages   # the probe does show the problem
  assert _faults("keep") < 0.01 * pages


@pytest.mark.parametrize("setting, expected", [
    ("on", True), ("off", False), ("true", True), ("False", False), (True, True), (False, False),
])
def test_wanted_explicit_settings(setting, expected):
  from frcnn_jax.runtime import host_memory
  assert host_memory.wanted(setting, environ={"JAX_PLATFORMS": "cuda"}) == expected


def test_wanted_auto_is_on_for_cpu_only():
  from frcnn_jax.runtime import host_memory
  assert host_memory.wanted("auto", environ={"JAX_PLATFORMS": "cpu"})
  assert not host_memory.wanted("auto", environ={"JAX_PLATFORMS": "cuda,cpu"})
  assert not host_memory.wanted("auto", environ={"JAX_PLATFORMS": "tpu"})
  with pytest.raises(ValueError, match="reuse_host_memory"):
    host_memory.wanted("sometimes")


def test_accelerator_expected_needs_a_plugin_and_its_devices():
  from frcnn_jax.runtime import host_memory
  expected = lambda names, files: host_memory.accelerator_expected({}, names, files)
  assert expected(["jax", "jax-cuda13-plugin"], ["/dev/nvidia0", "/dev/nvidiactl"])
  assert expected(["libtpu"], ["/dev/accel0"])
  assert expected(["libtpu"], ["/dev/vfio/0"])
  assert not expected(["jax", "jax-cuda12-plugin"], [])              # plugin, no GPU
  assert not expected(["jax"], ["/dev/nvidia0"])                     # GPU, CPU-only jaxlib
  assert not expected(["jax", "jax-cuda12-plugin"], ["/dev/nvidiactl"])
  assert not expected(["jax", "jax-cuda12-plugin"], ["/dev/accel0"])  # the wrong kind
