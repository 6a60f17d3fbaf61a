"""The sweep report's parts: collecting runs into cells with intervals, tables, plots."""
