"""Print README's case-study tables from a study's results.json, so that no number in README is typed by hand.

    .venv/bin/python scripts/readme_results.py STUDY_DIR/results.json

Prints, in Markdown: the line naming the command, run count, machine and torch; the summary table (metric
mean +- std over seeds and gap to FP32, per configuration and task: the report's own ``summary_rows``); and
the condensed claims ledger (``lossscale.study.ledger.ledger_summary``). The wall time of the study is not in
results.json: give it with ``--wall "27 min 09 s"`` (as measured by ``/usr/bin/time``).
"""

from __future__ import annotations

import argparse
import sys

from lossscale.study import ledger, report, schema


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a study's results.json")
    ap.add_argument("--wall", default=None, help="the study's wall time, as measured (not stored in the file)")
    args = ap.parse_args(argv)
    doc = schema.load_results(args.results)
    env, cfg = doc["environment"], doc["config"]
    wall = f", {args.wall} wall" if args.wall else ""
    print(
        f"`{doc.get('command', 'lossscale study')}` ({len(doc['runs'])} runs{wall}; {env.get('processor', '?')}, "
        f"{env.get('cpu_count', '?')} CPUs, torch {env['torch']}, {cfg['workers']} workers x "
        f"{env['threads_per_run']} thread; created {doc.get('created', '?')})\n"
    )
    header, rows = report.summary_rows(doc)
    print(_md(header, rows) + "\n")
    print(_md(["claim (the article)", "verdict (tasks)"], ledger.ledger_summary(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
