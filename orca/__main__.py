import sys

from orca.cli import main

sys.exit(main())
