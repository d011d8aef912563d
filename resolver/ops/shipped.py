"""Where the files shipped with the resolver are: the default rule file and the example config.

In the repository they are rules/exchanges.yaml and deploy/resolver.yaml. A wheel carries them
inside the package, in the same layout under resolver/ops/shipped_files/ (pyproject.toml maps
the two directories there), so an installed resolver finds them from any directory. In a
checkout, and in its editable install (`pip install -e .`, which imports from the checkout),
that directory does not exist and they are read where they are. (Paths rather than
importlib.resources: setuptools' editable import hook cannot import the data packages, as
rules/ and deploy/ have no __init__.py.)
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_INSTALLED = _HERE / "shipped_files"
_ROOT = _INSTALLED if _INSTALLED.is_dir() else _HERE.parent.parent

SHIPPED_RULES = str(_ROOT / "rules" / "exchanges.yaml")
EXAMPLE_CONFIG = str(_ROOT / "deploy" / "resolver.yaml")
