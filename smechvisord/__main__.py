from smechvisord.main import main

raise SystemExit(main())
