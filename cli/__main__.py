"""`python -m cli`: the `tandem` command."""

from cli.app import main

raise SystemExit(main())
