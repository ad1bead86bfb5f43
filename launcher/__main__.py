import sys

from launcher.entry import main

sys.exit(main())
