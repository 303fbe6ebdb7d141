"""``python -m mask2former``: the command line of ``mask2former.commands``."""

from mask2former.commands import main

raise SystemExit(main())
