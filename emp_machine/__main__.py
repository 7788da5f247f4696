from emp_machine.runtime.cli import main

raise SystemExit(main())
