"""``python -m megatron_t1.plan``: the same as ``python -m megatron_t1 plan``."""

from megatron_t1.plan.cli import main

raise SystemExit(main())
