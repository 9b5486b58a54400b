"""What ran a benchmark, and the memory figures of its programs and process."""

import os
import platform
import resource
import sys
from importlib import metadata
from typing import Any

import jax

# Packages whose versions the accelerator check records beside JAX's (absent ones are left out).
EXTRA_PACKAGES = ("flax", "optax", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu", "torch",
                  "torchvision")


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  return cpu


def device_name() -> str:
  """"platform:device_kind" of the first JAX device, e.g. "cpu:cpu" or "gpu:NVIDIA H100"."""
  device = jax.devices()[0]
  return f"{device.platform}:{device.device_kind}"


def on_cpu() -> bool:
  """True when JAX's first device is a CPU."""
  return jax.devices()[0].platform == "cpu"


def machine() -> dict[str, Any]:
  """What runs the benchmark.

  Returns:
    {"cpu": model name, "cpu_count", "jax", "jaxlib" (versions), "device" (`device_name`),
     "num_devices", "xla_flags" (the XLA_FLAGS environment variable, "" when unset)}.
  """
  return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "jaxlib": metadata.version("jaxlib"),
          "device": device_name(), "num_devices": jax.device_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def versions() -> dict[str, Any]:
  """`machine()` plus the installed versions of EXTRA_PACKAGES, the backend's platform
  version ("platform_version", where the client reports one) and torch's CUDA version
  ("torch_cuda", once torch is imported)."""
  info = machine()
  for package in EXTRA_PACKAGES:
    try:
      info[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  try:
    info["platform_version"] = jax.devices()[0].client.platform_version
  except Exception:  # pylint: disable=broad-except   # not every backend has one
    pass
  if "torch" in sys.modules:
    info["torch_cuda"] = getattr(sys.modules["torch"].version, "cuda", None)
  return info


def peak_memory() -> tuple[float, str]:
  """(MiB, source): the first local device's peak bytes in use where it reports them (GPU,
  TPU), else this process's peak resident set size (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def program_mib(compiled: Any) -> float | None:
  """A compiled program's buffers in MiB: arguments + outputs + temporaries - aliased (XLA's
  `memory_analysis`), or None where the backend gives none."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return total / 2**20
