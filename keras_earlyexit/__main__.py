"""`python -m keras_earlyexit`: the `keras-earlyexit` command line."""

import sys

from keras_earlyexit.cli import main

sys.exit(main())
