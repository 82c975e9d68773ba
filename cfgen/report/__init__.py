"""What is measured of a finished run, and shown: `cfgen evaluate` (the independent judge, evaluate.py),
`cfgen sweep` (fixed guidance scales, sweep.py) and `cfgen report` (the HTML page: page.py, html.py, plots.py)."""
