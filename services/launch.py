"""How Tandem starts ``tandem ...`` child processes (``tandem up``, tests, benchmarks).

``python -m`` puts the working directory first on ``sys.path``. Run from a checkout, that
makes the repository's own folders importable under their bare names, and ``kernels/``
then shadows Hugging Face's ``kernels`` package, which transformers imports when it is
installed. ``-P`` (Python 3.11+) leaves the working directory out; on 3.10 the child drops
it itself.
"""

from __future__ import annotations

import sys

_MAIN = "tandem.services.cli"


def tandem_argv(*args: str) -> list[str]:
    """The argv running ``tandem *args`` with this interpreter, cwd kept off sys.path."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", _MAIN, *args]
    code = f"import sys; del sys.path[0]; from {_MAIN} import main; sys.exit(main())"
    return [sys.executable, "-c", code, *args]
