"""validate: the Great Expectations gate on the manifest."""

from __future__ import annotations

import time
from pathlib import Path

from .. import timing
from ..config import section
from . import DataValidationError


def run(params: dict) -> "object":
    """Run the suite on the manifest; write the result JSON and Data Docs; fail loudly."""
    from ..data.manifest import read_manifest
    from ..io import write_json
    from ..validation import validate_manifest

    manifest = read_manifest(section(params, "prepare", ("manifest",))["manifest"])
    p = section(params, "validate", ("result", "docs"))
    started = time.perf_counter()
    report = validate_manifest(manifest, p, p["docs"])
    write_json(
        Path(p["docs"]) / "result.json", {"failures": [f.__dict__ for f in report.failures], "gx_result": report.result}
    )
    write_json(
        p["result"],
        {
            "success": report.success,
            "images": len(manifest),
            "failed_checks": len(report.errors),
            "warnings": len(report.failures) - len(report.errors),
        },
    )
    timing.record(params, "validate", seconds=time.perf_counter() - started)
    if not report.success:
        lines = [
            f"  {f.check}: {f.count} rows - {f.reason}; e.g. {'; '.join(f.described()) or f.column}"
            for f in report.errors
        ]
        error = DataValidationError("data validation failed (see " + p["docs"] + "/index.html):\n" + "\n".join(lines))
        error.report = report
        raise error
    return report
