"""``python -m convert`` is ``python -m convert.hf_to_orbax``."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion needs no accelerator

from convert.hf_to_orbax import main  # noqa: E402

sys.exit(main())
