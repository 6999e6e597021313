"""`python -m musicrfm` is the `musicrfm` command."""

import sys

from musicrfm.main import main

sys.exit(main())
