from __future__ import annotations

import sys

from ditq.cli import main

sys.exit(main())
