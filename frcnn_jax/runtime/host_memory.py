"""Makes glibc keep freed host memory for reuse: XLA:CPU steps stop page-faulting it back in.

XLA:CPU allocates each step's buffers with malloc. glibc serves blocks above its mmap threshold
(at most 32 MiB), and any large block requested from a worker thread's arena, with a fresh
`mmap` and returns them with `munmap` when freed, so every step the kernel zero-fills the same
hundreds of MiB again, page by page: system time that can be a large share of a CPU training run
(benchmarks/RESULTS.md, runs G/H and "Shapes training rate"). `keep_freed_memory` turns this off
for the process: one malloc arena, no mmap'd blocks and no trimming of the heap, so a freed step
buffer is reused by the next step. The cost is that the process keeps its peak heap for its
lifetime, which is what a training process does anyway.

It must run before the threads that allocate (XLA's thread pools start with the first JAX
computation); `frcnn_jax.train` calls it first thing when `wanted(train.reuse_host_memory)`.
The setting is "auto" by default: on where JAX will run on the CPU, off where it will run on a
GPU or TPU (whose step buffers live on the device: there the fix only costs host memory),
judged from JAX_PLATFORMS and the installed plugins and device files without starting JAX.
"""

import ctypes
import ctypes.util
import fnmatch
import glob
import logging
import os
import platform
from collections.abc import Iterable
from collections.abc import Mapping
from importlib import metadata

SETTINGS = ("auto", "on", "off")   # train.reuse_host_memory; "true" / "false" also accepted
_PLUGINS = {"gpu": ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm"), "tpu": ("libtpu",)}
_DEVICE_FILES = {"gpu": ("/dev/nvidia[0-9]*", "/dev/kfd"), "tpu": ("/dev/accel*",
                                                                    "/dev/vfio/[0-9]*")}

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to one arena, no mmap'd blocks and no heap trimming.

  Returns:
    True when applied; False where the C library is not glibc (nothing changes then).
  """
  if platform.libc_ver()[0] != "glibc":
    logging.info("host_memory: the C library is not glibc; malloc left as it is")
    return False
  mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  applied = [mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))]
  ok = all(applied)
  if not ok:
    logging.warning("host_memory: glibc refused a mallopt setting; malloc partly unchanged")
  return ok


def wanted(setting: str | bool, environ: Mapping[str, str] | None = None) -> bool:
  """Whether to call `keep_freed_memory` for a `train.reuse_host_memory` setting.

  Args:
    setting: "on" / True, "off" / False, or "auto" (on unless `accelerator_expected()`).
    environ: the environment to judge "auto" by (default os.environ).

  Raises:
    ValueError: an unknown setting.
  """
  if isinstance(setting, bool):
    return setting
  value = {"true": "on", "false": "off"}.get(str(setting).lower(), str(setting).lower())
  if value not in SETTINGS:
    raise ValueError(f"train.reuse_host_memory must be one of {SETTINGS} (or true / false), "
                     f"got {setting!r}")
  if value == "auto":
    return not accelerator_expected(os.environ if environ is None else environ)
  return value == "on"


def accelerator_expected(environ: Mapping[str, str],
                         distributions: Iterable[str] | None = None,
                         device_files: Iterable[str] | None = None) -> bool:
  """Whether JAX will pick a GPU or TPU, judged without starting it.

  JAX_PLATFORMS decides when set (its first entry); otherwise an accelerator is expected when a
  GPU plugin (jax-cuda*, jax-rocm*) or libtpu is installed and that kind's device files exist.

  Args:
    environ: the environment.
    distributions: installed distribution names (default: importlib.metadata's).
    device_files: existing device paths to test (default: globbed from /dev).
  """
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() not in ("cpu", "")
  if distributions is None:
    distributions = (d.metadata["Name"] or "" for d in metadata.distributions())
  names = [n.lower() for n in distributions]
  if device_files is None:
    device_files = [p for patterns in _DEVICE_FILES.values() for pattern in patterns
                    for p in glob.glob(pattern)]
  files = list(device_files)
  for kind, prefixes in _PLUGINS.items():
    installed = any(n.startswith(prefixes) for n in names)
    present = any(fnmatch.fnmatch(f, pattern) for f in files for pattern in _DEVICE_FILES[kind])
    if installed and present:
      return True
  return False

