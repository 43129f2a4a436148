"""``python -m draftopd.cli``: the same as the ``draftopd`` command."""

from draftopd.cli.app import main

raise SystemExit(main())
