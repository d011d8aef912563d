"""Where the files shipped with the resolver are: the default rule file and the example config."""

from pathlib import Path

import resolver

_ROOT = Path(resolver.__file__).resolve().parent.parent
SHIPPED_RULES = str(_ROOT / "rules" / "exchanges.yaml")
EXAMPLE_CONFIG = str(_ROOT / "deploy" / "resolver.yaml")
