import sys

from jrt.cli import main

sys.exit(main())
