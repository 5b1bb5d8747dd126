import sys

from resstream.cli import main

sys.exit(main())
