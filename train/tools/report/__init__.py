"""``mimo-report``: pictures of one or more runs from their run directories, with no service running.

Reads ``metrics.jsonl`` and ``config.yaml`` (``runs``), draws PNG figures (``figures``: loss, schedule,
throughput, expert load, data mixture; several runs on the same axes) and writes ``summary.md`` (``summary``)
with the headline numbers and the figures linked. ``cli`` is the command.
"""
