"""``python -m imgsvc_client``: the ``imgsvc`` command line (``imgsvc_client.cli``)."""

import sys

from imgsvc_client.cli import main

sys.exit(main())
