"""The front page of ``snakemake --report report.html``: the study's results table and plots in
the page itself, and a warning naming every result that changed after the report stage ran.

Snakemake shows its report's items (tables, images) behind icons; its front page is an rst text
(the ``report:`` directive). This module writes that text when the report stage has produced
its files: the static description (``workflow/report/workflow.rst``), the results table (the
body of ``results.html``) and the plots (inlined PNGs). When an input of the report stage is
newer than its output (``snakemake -f`` on one evaluation, say) or missing, the page opens with
a warning that lists those files and says how to bring the report up to date: ``--report``
itself never runs a job. The page goes to Snakemake's own folder of the working directory
(``.snakemake/``), never into ``results/``. Pure standard library: it runs where Snakemake is
typed.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

PAGE = Path(".snakemake") / "luffy-report-page.rst"
PLOTS = (("results.png", "Accuracy per suite"), ("training_curves.png", "Training curves"))


def stale_inputs(report_file: Path, inputs: list[str]) -> list[str]:
    """The inputs of the report stage that are missing or newer than ``report_file``."""
    made = report_file.stat().st_mtime
    stale = []
    for path in inputs:
        try:
            if os.stat(path).st_mtime > made:
                stale.append(path)
        except FileNotFoundError:
            stale.append(f"{path} (missing)")
    return stale


def _indent(text: str) -> str:
    return "\n".join(f"   {line}" if line.strip() else "" for line in text.splitlines())


def _html_body(html: str) -> str:
    match = re.search(r"<body[^>]*>(.*)</body>", html, flags=re.S | re.I)
    return match.group(1) if match else html


def page_text(description: str, report_dir: Path, stale: list[str], update_command: str) -> str:
    """The rst of the front page (Snakemake renders it with Jinja, hence the raw blocks)."""
    parts = [description.rstrip(), ""]
    if stale:
        listed = "\n".join(f"- ``{path}``" for path in stale)
        parts += [".. warning::", "",
                  _indent(f"These results changed after the report stage ran, so the table and plots below "
                          f"predate them:\n\n{listed}\n\nBring the report up to date with ``{update_command}``, "
                          f"then ``--report`` again."), ""]
    body = _html_body((report_dir / "results.html").read_text(encoding="utf-8"))
    parts += ["Results", "-------", "", ".. raw:: html", "", _indent("{% raw %}" + body + "{% endraw %}"), ""]
    for name, title in PLOTS:
        image = report_dir / name
        if image.is_file():
            # in lines of 76 (docutils refuses lines over 10,000 characters; URL parsers drop newlines)
            data = base64.encodebytes(image.read_bytes()).decode("ascii").rstrip()
            parts += [title, "-" * len(title), "", ".. raw:: html", "",
                      _indent(f'<img alt="{title}" style="max-width:100%" src="data:image/png;base64,\n{data}">'), ""]
    return "\n".join(parts) + "\n"


def front_page(description_file: str, report_dir: str, inputs: list[str], update_command: str) -> str:
    """The path of the report's front page: ``description_file`` until the report stage has run,
    then a page written to ``.snakemake/`` with the results inline (and any stale inputs named)."""
    report_dir_path = Path(report_dir)
    marker = report_dir_path / "results.md"
    if not (marker.is_file() and (report_dir_path / "results.html").is_file()):
        return description_file
    text = page_text(Path(description_file).read_text(encoding="utf-8"), report_dir_path,
                     stale_inputs(marker, inputs), update_command)
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    tmp = PAGE.with_name(f".{PAGE.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, PAGE)
    return str(PAGE.resolve())
