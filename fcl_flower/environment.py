"""The compute environment a number came from: recorded with every round and every cell.

A seeded run reproduces to the last digit on one machine, but not on another: PyTorch's
CPU kernels (oneDNN's convolutions) take other paths on another instruction set, and over
hundreds of training steps differences in the last bits grow into Dice differences of a
few hundredths a site (docs/RESULTS.md, "Whether a cell reproduces on another machine").
So every site sends, with each result, what its arithmetic depended on beside the config
and the seed, as JSON in the metric ``environment``; the server stores it with each
pre-training round (``rounds.jsonl``) and each fine-tuning cell (``results.json``), under
a short content id, beside its own.

Stored form (``EnvironmentRecord``)::

    {"server": "3f1c9a0b", "sites": {"site_00": "3f1c9a0b", "site_01": "a71e22d4"},
     "described": {"3f1c9a0b": {"torch": "2.13.0+cpu", "cpu_capability": "AVX512", ...}, ...}}

A site that sends no environment (an older client), or one that cannot be read, is left
out of ``sites``; the round or cell is stored all the same.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping

ENVIRONMENT = "environment"  # the metric a site's environment travels in (a JSON string)
SIMD_FLAG_PREFIXES = ("sse4", "avx", "fma", "amx", "f16c")  # the CPU flags oneDNN and numpy dispatch on
# Environment variables that change which kernels run (and so the last bits of a result).
KERNEL_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "NPY_DISABLE_CPU_FEATURES")

# A site's description is a few hundred characters; anything longer is not stored, so that a
# faulty site cannot swell every round record.
MAX_ENVIRONMENT_CHARS = 4096

EnvironmentRecord = dict[str, Any]


@functools.cache
def cpu_description() -> tuple[str, str]:
    """The CPU's model name and its vector extensions (``avx2 avx512f fma ...``).

    From the first processor in ``/proc/cpuinfo`` on Linux; elsewhere the model is what
    ``platform`` knows and the extensions are unknown (``""``).
    """
    model, flags = platform.processor() or platform.machine(), ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = dict(line.split(":", 1) for line in cpuinfo.read_text(errors="replace").split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields.get("model name", model)
        flags = " ".join(sorted(f for f in fields.get("flags", "").split() if f.startswith(SIMD_FLAG_PREFIXES)))
    return model, flags


def compute_environment() -> dict[str, str]:
    """What this process's arithmetic depends on beside the config and the seed.

    Package versions, the platform (system, architecture, C library), the CPU's model and
    vector extensions, the instruction set PyTorch's CPU kernels dispatch to
    (``torch.backends.cpu.get_cpu_capability()``) and any environment variable in
    ``KERNEL_LIMITS`` that is set. Not the number of threads: the config sets it.
    """
    import monai
    import numpy
    import torch

    limits = " ".join(f"{name}={os.environ[name]}" for name in KERNEL_LIMITS if os.environ.get(name))
    cpu, simd = cpu_description()
    libc = " ".join(platform.libc_ver()).strip()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "monai": monai.__version__,
        "platform": " ".join(p for p in (platform.system(), platform.machine(), libc) if p),
        "cpu": cpu,
        "simd": simd,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_limits": limits,
    }


def environment_id(environment: Mapping[str, str]) -> str:
    """An 8-hex content id: equal environments get equal ids, on any machine."""
    return hashlib.sha256(json.dumps(dict(environment), sort_keys=True).encode()).hexdigest()[:8]


def environment_metric() -> str:
    """``compute_environment()`` as the JSON string a site sends in ``metrics["environment"]``."""
    return json.dumps(compute_environment(), sort_keys=True)


def read_environment(value: Any) -> dict[str, str] | None:
    """A site's ``metrics["environment"]`` back as a dict; None if absent, longer than
    ``MAX_ENVIRONMENT_CHARS``, or not a JSON object of strings."""
    if not isinstance(value, str) or len(value) > MAX_ENVIRONMENT_CHARS:
        return None
    try:
        environment = json.loads(value)
    except ValueError:
        return None
    if not isinstance(environment, dict) or not all(isinstance(v, str) for v in environment.values()):
        return None
    return environment


def environment_record(server: Mapping[str, str], site_metrics: Mapping[str, Mapping[str, Any]]) -> EnvironmentRecord:
    """The stored form (module docstring) of the server's environment and the sites' metrics.

    ``site_metrics``: site name -> the metrics of one result of that site. A site whose
    metrics carry no readable environment is left out of ``sites``.
    """
    described = {environment_id(server): dict(server)}
    sites = {}
    for site, metrics in sorted(site_metrics.items()):
        environment = read_environment(metrics.get(ENVIRONMENT))
        if environment is not None:
            sites[site] = environment_id(environment)
            described[sites[site]] = environment
    return {"server": environment_id(server), "sites": sites, "described": described}


def merge_records(records: list[EnvironmentRecord]) -> EnvironmentRecord:
    """One record for results gathered over several messages (the rounds and folds of a cell).

    A site seen under more than one environment gets its ids joined by ``+`` in sorted order.
    """
    sites: dict[str, set[str]] = {}
    described: dict[str, dict[str, str]] = {}
    for record in records:
        described.update(record["described"])
        for site, ident in record["sites"].items():
            sites.setdefault(site, set()).add(ident)
    return {
        "server": "+".join(sorted({r["server"] for r in records})),
        "sites": {site: "+".join(sorted(ids)) for site, ids in sorted(sites.items())},
        "described": dict(sorted(described.items())),
    }


def describe(environment: Mapping[str, str]) -> str:
    """One line: ``torch 2.13.0+cpu, numpy 2.4.6, monai 1.6.1, AVX512, Intel(R) Xeon(R) Processor, Linux-...``."""
    parts = [f"torch {environment.get('torch', '?')}", f"numpy {environment.get('numpy', '?')}",
             f"monai {environment.get('monai', '?')}", environment.get("cpu_capability", "?"),
             environment.get("cpu", "?"), environment.get("platform", "?")]
    if environment.get("kernel_limits"):
        parts.append(environment["kernel_limits"])
    return ", ".join(parts)
