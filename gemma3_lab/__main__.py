from gemma3_lab.app.cli import main

raise SystemExit(main())
