"""`python -m radixlm.launch_server [options]`: same as `radixlm serve`, SGLang's spelling."""
from __future__ import annotations

import sys

from radixlm.runtime.cli import serve

if __name__ == "__main__":
    sys.exit(serve(None, prog="python -m radixlm.launch_server"))
