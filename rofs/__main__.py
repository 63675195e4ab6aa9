from rofs.cli import main

raise SystemExit(main())
