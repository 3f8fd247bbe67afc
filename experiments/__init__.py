"""The research studies of the miniature (experiments/README.md), each run as `python -m experiments.<study>` from
the repository root: experiments/runner.py runs their stages, experiments/miniature.py holds their settings."""
