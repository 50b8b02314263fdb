"""Generated gRPC stubs are committed; this fails when they are stale against protos/."""

import subprocess
import sys


def test_committed_stubs_match_protos():
    r = subprocess.run([sys.executable, "-m", "services.local.codegen", "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
