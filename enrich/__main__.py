"""`python -m enrich` is the same as the `enrich` command."""

from enrich.cli import main

raise SystemExit(main())
