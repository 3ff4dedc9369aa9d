"""`python -m modeling_safe_llava ...` runs the `safe-llava` command line."""

from .tools.cli import main


raise SystemExit(main())
