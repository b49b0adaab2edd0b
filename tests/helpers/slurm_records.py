"""SLURM's own record of the jobs a test ran (CI's SLURM has no accounting: ``scontrol``, which
keeps finished jobs for MinJobAge, an hour there)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def job_records(workdir: Path) -> dict[int, dict[str, str]]:
    """Every job that ran in ``workdir``: its id -> the fields of ``scontrol show job``."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("WorkDir") == str(workdir):
            jobs[int(fields["JobId"])] = fields
    return jobs
