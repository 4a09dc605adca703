"""The `pqk` command line: `app` and its commands, one module per group of commands."""

from __future__ import annotations

import sys

from pqk.cli.common import app, err

# Importing a module registers its commands; `pqk --help` lists them in this order.
from pqk.cli import models  # noqa: F401,E402,I001 (infer, export, workload, eval, teacher)
from pqk.cli import plans  # noqa: F401,E402 (run, budget, report)
from pqk.cli import methods  # noqa: F401,E402 (quantize, prune, distill)
from pqk.cli.methods import _parse_rhos  # noqa: F401 (tests)
from pqk.errors import PqkError


def main() -> None:
    try:
        app()
    except PqkError as exc:
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written to the output folder")
        sys.exit(130)


if __name__ == "__main__":
    main()
