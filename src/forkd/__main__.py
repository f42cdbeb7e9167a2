import sys

from forkd.cli import main

sys.exit(main())
