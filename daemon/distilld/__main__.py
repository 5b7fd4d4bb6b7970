from distilld.cli import main

raise SystemExit(main())
