"""Makes glibc keep freed host memory for reuse: XLA:CPU steps stop page-faulting it back in.

XLA:CPU allocates each step's buffers with malloc. glibc serves blocks above its mmap threshold
(at most 32 MiB), and any large block requested from a worker thread's arena, with a fresh
`mmap` and returns them with `munmap` when freed, so every step the kernel zero-fills the same
hundreds of MiB again, page by page. On the shapes run that was a quarter of all CPU time (system
time, ~100k minor page faults per second). `keep_freed_memory` turns this off for the process:
one malloc arena, no mmap'd blocks and no trimming of the heap, so a freed step buffer is reused
by the next step. The cost is that the process keeps its peak heap for its lifetime, which is
what a training process does anyway.

It must run before the threads that allocate (XLA's thread pools start with the first JAX
computation); `frcnn_jax.train` calls it first thing when `train.reuse_host_memory` is set.
"""

import ctypes
import ctypes.util
import logging
import platform

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
