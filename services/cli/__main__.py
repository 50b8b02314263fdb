"""`python -m services.cli ...` is `epserve ...` (how the local tooling starts services)."""

import sys

from services.cli import main

sys.exit(main())
