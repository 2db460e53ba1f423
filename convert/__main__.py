"""`python -m convert from-raven|to-raven|logits ...` (convert/cli.py)."""

from __future__ import annotations

import sys

from convert.cli import main

sys.exit(main())
