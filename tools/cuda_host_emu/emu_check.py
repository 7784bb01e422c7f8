"""What the host-emulation checks share: the import paths (repo root and tests/), the built
emulation module (HEMU_SO, default build/cuda_host_emu/hemu.so) and the relative error."""
import importlib.util
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)


def load_hemu():
    so = os.environ.get("HEMU_SO", os.path.join(ROOT, "build", "cuda_host_emu", "hemu.so"))
    spec = importlib.util.spec_from_file_location("hemu", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()
