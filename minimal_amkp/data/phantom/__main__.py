"""`python -m minimal_amkp.data.phantom`: generate a phantom ChestX-ray14, or compare a folder's boxes with the release."""
import sys

from minimal_amkp.data.phantom import main

sys.exit(main())
