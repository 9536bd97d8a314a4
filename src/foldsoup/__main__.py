import os
import sys

# Under a local Snakemake run a job server may hold torch already imported (foldsoup.zygote);
# it runs the step only for a job of its own interpreter, else (None) the step runs here.
_server = os.environ.get("FOLDSOUP_JOB_SERVER")
if _server:
    from foldsoup.zygote import run_via_server

    _status = run_via_server(_server, sys.argv[1:])
    if _status is not None:
        sys.exit(_status)

from foldsoup.cli import main  # noqa: E402

sys.exit(main())
