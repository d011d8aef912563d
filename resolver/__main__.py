"""`python -m resolver` is the same as the `resolver` command."""

import sys

from .cli import main

sys.exit(main())
