"""Import every module of the installed clipdistill package: a dependency missing from pyproject.toml
fails here (the test suite's venv is installed from requirements.txt and would hide it)."""

import importlib
import pkgutil
import sys

import clipdistill

failed = []
names = [clipdistill.__name__]
names += [m.name for m in pkgutil.walk_packages(clipdistill.__path__, prefix="clipdistill.")]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:  # report every broken module, not only the first
        failed.append(f"{name}: {type(e).__name__}: {e}")
if failed:
    sys.exit("modules that do not import:\n  " + "\n  ".join(failed))
if "site-packages" not in clipdistill.__file__:
    sys.exit(f"clipdistill was imported from {clipdistill.__file__}, not from the installed package")
torch = sys.modules["torch"]
print(f"imported {len(names)} modules of clipdistill {clipdistill.__version__} (torch {torch.__version__})")
