import sys

from services.statestore.main import main

sys.exit(main())
