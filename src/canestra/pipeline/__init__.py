"""The batch data flow: ingest -> split -> train -> predict/evaluate, with metrics and the HTML report."""
