"""`python -m enrich` is the same as the `enrich` command."""

from enrich.launch import main

raise SystemExit(main())
