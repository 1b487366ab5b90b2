"""``python -m detreg_runtime``: start the HTTP retrieval service (:func:`detreg_runtime.service.main`)."""

import sys

from detreg_runtime.service import main

sys.exit(main())
