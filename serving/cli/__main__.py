from seqrank.serving.cli import main

raise SystemExit(main())
