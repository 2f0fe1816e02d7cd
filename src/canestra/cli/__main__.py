from canestra.cli.commands import main

raise SystemExit(main())
