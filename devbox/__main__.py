"""`python -m devbox` runs the command-line client."""
import sys

from devbox.cli import main

sys.exit(main())
