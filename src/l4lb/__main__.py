"""``python -m l4lb`` is the ``l4lb`` command."""

import sys

from l4lb.cli import main

sys.exit(main())
