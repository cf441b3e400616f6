"""``python -m fedglmm.cli``: the command line."""
from . import main

main()
