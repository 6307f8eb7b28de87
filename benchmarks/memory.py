"""Peak memory of training through a relaxation: BPTT vs checkpointed BPTT vs implicit vs hybrid.

For now this reports what is built (kernels, devices) and which relaxation modes are importable; the
side-by-side memory measurement lands with issue #7 (it needs the relaxation modes of issue #6).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

import gdeq_ext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()

    info = gdeq_ext.build_info()
    modes = {name: hasattr(gdeq_ext, name) for name in ("BPTTRelax", "ImplicitRelax", "HybridRelax")}
    report = {
        "gdeq_ext": gdeq_ext.__version__,
        "build": info,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "relaxation_modes_available": modes,
        "memory_benchmark": "not yet implemented (issue #7)",
    }
    print(f"gdeq_ext {gdeq_ext.__version__} with torch {torch.__version__}")
    print(f"  compiled extension: {info['compiled']}" + ("" if info["compiled"] else f" ({info.get('reason')})"))
    if info["compiled"]:
        print(f"  CUDA kernels compiled: {info['with_cuda']} ({info['cuda_decision']})")
        print(f"  OpenMP: {info['openmp']}")
    print(f"  CUDA device visible: {info['cuda_device_available']}")
    for name, present in modes.items():
        print(f"  {name}: {'available' if present else 'not yet implemented'}")
    print("The memory benchmark itself (BPTT vs implicit vs hybrid) is issue #7 and is not implemented yet.")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
