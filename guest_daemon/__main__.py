"""``python -m fireclaw.guest_daemon``: run the guest daemon."""

import sys

from .daemon import main

sys.exit(main())
