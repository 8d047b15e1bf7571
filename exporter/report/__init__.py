"""What a run tells its user: report.json and the one-screen summary, report.md and its figure. Rendering
only: every number comes from what the run measured.

    summary.py   report.json, parameter counts, the realised ratio, the summary printed at the end
    markdown.py  report.md
    plots.py     the rank plan as a heat map and tokens/s dense vs compressed
"""
