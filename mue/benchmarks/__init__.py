"""The reproduction and benchmark drivers behind scripts/ (demo, reproduce): training runs, sweeps, reports."""
