"""``python -m mixq`` runs the command-line interface."""

from mixq.cli import main

raise SystemExit(main())
