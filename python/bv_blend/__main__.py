"""`python -m bv_blend ...` (and `torchrun -m bv_blend ...`): the same as the `bv-blend` command."""

from bv_blend.cli import main

raise SystemExit(main())
