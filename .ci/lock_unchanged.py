"""Fail (exit 1) when the workspace's dvc.lock differs from the committed one; name each stage that differs and
the paths whose hashes changed."""

import subprocess
import sys

import yaml


def _entries(stage: dict) -> dict[str, str]:
    found = {}
    for kind in ("deps", "outs"):
        for item in stage.get(kind, []):
            found[f"{kind[:-1]} {item['path']}"] = item.get("md5") or item.get("hash", "")
    for params_file, values in stage.get("params", {}).items():
        for key, value in values.items():
            found[f"param {params_file}:{key}"] = repr(value)
    found["cmd"] = stage.get("cmd", "")
    return found


committed = yaml.safe_load(
    subprocess.run(["git", "show", "HEAD:dvc.lock"], capture_output=True, text=True, check=True).stdout
)["stages"]
current = yaml.safe_load(open("dvc.lock"))["stages"]
differences = []
for stage in sorted(set(committed) | set(current)):
    before, after = _entries(committed.get(stage, {})), _entries(current.get(stage, {}))
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        differences.append(f"stage {stage}: " + ", ".join(changed))
if differences or subprocess.run(["git", "diff", "--quiet", "dvc.lock"]).returncode:
    print(
        "dvc.lock after `make run` differs from the committed one:\n  " + "\n  ".join(differences or ["(layout only)"])
    )
    sys.exit(1)
print("dvc.lock after `make run` equals the committed one")
