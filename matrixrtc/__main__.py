from matrixrtc.cli import main

raise SystemExit(main())
