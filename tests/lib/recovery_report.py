"""Collect 'seconds from fault to recovery' figures from the behaviour tests.

Tests call ``recovery.record(name, seconds)``. At the end of the session the figures are
printed as a table and written as JSON to $CELERY_BUNDLE_RESULTS_DIR (default: the
scenario's directory) as recovery-<scenario>.json.
"""

import json
import os
from pathlib import Path


class Recovery:
    def __init__(self, scenario):
        self.scenario = scenario
        self.figures = {}

    def record(self, name, seconds, **details):
        self.figures[name] = {"seconds": round(seconds, 1), **details}

    def table(self):
        lines = [f"Recovery figures ({self.scenario}): seconds from the fault to the task running again"]
        for name, fig in self.figures.items():
            extra = " ".join(f"{k}={v}" for k, v in fig.items() if k != "seconds")
            lines.append(f"  {name:<48} {fig['seconds']:>7.1f} s  {extra}")
        return "\n".join(lines)

    def save(self):
        out_dir = Path(os.environ.get("CELERY_BUNDLE_RESULTS_DIR", "."))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"recovery-{self.scenario}.json"
        path.write_text(json.dumps(self.figures, indent=2, sort_keys=True) + "\n")
        return path
