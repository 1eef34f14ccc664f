"""`python -m clients.eval` runs the quality evaluation, which now lives in the core package as
`python -m vbon.evaluation` (vbon/evaluation.py): it samples on an offline vLLM engine in this
process, not through the gateway, so it is no HTTP client. This entry point stays because
`make eval` and the docs name it; options and output are the same."""

from __future__ import annotations

import sys

from vbon.evaluation import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m clients.eval"))
