"""``python -m chatd`` runs the command line."""

from chatd.cli import main

raise SystemExit(main())
