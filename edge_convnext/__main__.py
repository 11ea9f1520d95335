from edge_convnext.cli import main

raise SystemExit(main())
