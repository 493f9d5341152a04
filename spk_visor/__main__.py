from spk_visor.cli import main

raise SystemExit(main())
