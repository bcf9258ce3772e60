"""`python -m kljax.audit`: the command line of `kljax.audit.cli`."""

from kljax.audit.cli import main

raise SystemExit(main())
