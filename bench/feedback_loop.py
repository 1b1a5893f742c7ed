"""The feedback loop end to end, with real processes on 127.0.0.1: `bentoml serve` of the champion, an operator
POSTing false alarms of one category to /feedback (one of them twice), then the retrain flow.

In a scratch clone of this checkout (sharing its DVC cache, so the committed pipeline outputs are there):
1. serve the champion with a feedback inbox and a token; /feedback without the token (401) and with a
   non-image (400) store nothing;
2. render fresh normal images of ``--category`` (indices the dataset never used), score them with /predict, and
   send the first ``--false-alarms`` the model rejects (false alarms) to /feedback, the first one twice;
3. run the retrain flow on the inbox (no push): the images are validated, added once each, the pipeline
   retrains, the export stage promotes only if not worse;
4. the false-reject rate at the calibrated threshold before and after, on the category's test normals (from
   the evaluations) and on ``--held-out`` further fresh normals never sent (scored by the old and the new model).
Writes bench/results/feedback_loop.{json,md}. Needs `make run` first (the champion and its outputs in the cache).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import quiet_offline_env, write_results  # noqa: E402
from vqflow.io import read_json  # noqa: E402
from vqflow.testing import bentoml_server  # noqa: E402

TOKEN = "feedback-bench-token"


def _run(command: list[str], cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def scratch_clone(work: Path) -> Path:
    """A clone of HEAD whose DVC cache is this checkout's: `dvc checkout` restores the committed outputs."""
    repo = work / "repo"
    _run(["git", "clone", "-q", str(ROOT), str(repo)], work)
    _run(["git", "config", "user.email", "bench@localhost"], repo)
    _run(["git", "config", "user.name", "bench"], repo)
    dvc = str(Path(sys.executable).parent / "dvc")
    _run([dvc, "cache", "dir", "--local", str(ROOT / ".dvc/cache")], repo)
    _run([dvc, "checkout", "--quiet"], repo)
    return repo


def fresh_normals(category: str, start: int, count: int, size: int) -> list[bytes]:
    from vqflow.data.synthetic import render_sample

    images = []
    for index in range(start, start + count):
        buf = io.BytesIO()
        Image.fromarray(render_sample(category, "train", index, size=size)[0]).save(buf, format="PNG")
        images.append(buf.getvalue())
    return images


def rejection_rate(model_dir: Path, images: list[bytes], category: str) -> float:
    """Share of ``images`` the model rejects at its calibrated threshold of ``category``."""
    from vqflow.inference import Predictor

    predictor = Predictor(model_dir, "cpu")
    rejected = 0
    for start in range(0, len(images), 16):
        batch = [predictor.decode(data) for data in images[start : start + 16]]
        rejected += sum(r.is_anomaly for r in predictor.predict(batch, category))
    return rejected / len(images)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="wood")
    parser.add_argument("--false-alarms", type=int, default=4, help="distinct false alarms sent (one is sent twice)")
    parser.add_argument("--candidates", type=int, default=600, help="fresh normals scored to find false alarms")
    parser.add_argument("--held-out", type=int, default=200, help="further fresh normals, never sent")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vqflow-feedback-"))
    env = {**quiet_offline_env(work), "PREFECT_LOGGING_LEVEL": "WARNING"}
    repo = scratch_clone(work)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    size = int(params["features"]["image_size"])
    _run([sys.executable, "-m", "vqflow.cli", "export"], repo, env)  # the champion into this run's model store
    exported = read_json(repo / params["outputs"]["export"])
    inbox = work / "line/inbox"
    old_model = work / "champion-model"
    _run(["cp", "-r", str(repo / params["outputs"]["model"]), str(old_model)], work)
    metrics_before = read_json(repo / params["outputs"]["metrics"])

    serve_env = {**env, "VQFLOW_INBOX": str(inbox), "VQFLOW_FEEDBACK_TOKEN": TOKEN, "VQFLOW_MODEL_TAG": exported["tag"]}
    candidates = fresh_normals(args.category, 10_000, args.candidates, size)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with bentoml_server(serve_env, cwd=repo) as (url, _):
        refused = [
            requests.post(
                f"{url}/feedback",
                files={"image": ("a.png", candidates[0], "image/png")},
                data={"category": args.category},
                timeout=60,
            ).status_code,
            requests.post(
                f"{url}/feedback",
                files={"image": ("notes.png", b"not an image", "image/png")},
                data={"category": args.category},
                headers=auth,
                timeout=60,
            ).status_code,
        ]
        written_after_refusals = _files(inbox.parent)
        scores, alarms = [], []
        for data in candidates:
            body = requests.post(
                f"{url}/predict",
                files={"image": ("c.png", data, "image/png")},
                data={"category": args.category},
                timeout=60,
            ).json()
            scores.append(body["score"])
            if body["is_anomaly"] and len(alarms) < args.false_alarms:
                alarms.append(data)
        if len(alarms) < args.false_alarms:
            raise SystemExit(f"only {len(alarms)} of {args.candidates} fresh {args.category} normals are false alarms")
        answers = []
        for data in [*alarms, alarms[0]]:
            answer = requests.post(
                f"{url}/feedback",
                files={"image": ("alarm.png", data, "image/png")},
                data={"category": args.category, "label": "normal"},
                headers=auth,
                timeout=60,
            )
            answer.raise_for_status()
            answers.append(answer.json())
    print(f"sent {len(answers)} confirmations ({sum(a['duplicate'] for a in answers)} duplicate); retraining ...")

    started = time.perf_counter()
    code = f"import json; from flows.retrain import retrain; print('RESULT', json.dumps(retrain({str(repo)!r}, inbox={str(inbox)!r}, push=False)))"
    out = _run([sys.executable, "-c", code], repo, {**env, "PYTHONPATH": str(repo)})
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    retrain_seconds = time.perf_counter() - started
    added = [p for p in _files(repo / "data/added") if p.endswith(".png")]
    held_out = fresh_normals(args.category, 20_000, args.held_out, size)
    rates = {
        "before": rejection_rate(old_model, held_out, args.category),
        "after": rejection_rate(repo / params["outputs"]["model"], held_out, args.category),
    }
    metrics_after = read_json(repo / params["outputs"]["metrics"])
    report = result["false_rejects"].get(args.category, {})
    payload = {
        "category": args.category,
        "posts": len(answers),
        "duplicates": sum(a["duplicate"] for a in answers),
        "refused_statuses": refused,
        "written_after_refusals": written_after_refusals,
        "candidates": args.candidates,
        "candidates_rejected": sum(s > answers[0]["sidecar"]["threshold"] for s in scores),
        "retrain": {k: result[k] for k in ("status", "tag", "from_feedback", "champion_before", "champion_after")},
        "images_added": len(result["added"]),
        "added_files": added,
        "inbox_after": _files(inbox),
        "retrain_seconds": round(retrain_seconds, 1),
        "false_rejects": report,
        "held_out_frr": rates,
        "held_out": args.held_out,
        "test_frr": {
            "before": metrics_before["at_threshold"][args.category]["false_reject_rate"],
            "after": metrics_after["at_threshold"][args.category]["false_reject_rate"],
        },
        "mad": {"before": metrics_before["mean"]["mad"], "after": metrics_after["mean"]["mad"]},
    }
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    table = "\n".join(
        [
            f"Operator feedback on `{args.category}`: {len(answers)} POSTs to /feedback ({payload['duplicates']} a repeat "
            f"of an earlier image) of normals the champion rejected ({payload['candidates_rejected']} of "
            f"{args.candidates} fresh normals were false alarms). Without the token: {refused[0]}; a non-image: "
            f"{refused[1]}; files written by the refused requests: {len(written_after_refusals)}.",
            "",
            f"Retrain flow: {payload['images_added']} images added ({result['from_feedback']} from feedback), "
            f"inbox left with {len(payload['inbox_after'])} files, model **{result['status']}** "
            f"({retrain_seconds:.0f} s).",
            "",
            "| false-reject rate at the calibrated threshold | before | after |",
            "|---|---:|---:|",
            f"| {args.held_out} fresh `{args.category}` normals never sent (held out) | {pct(rates['before'])} | "
            f"{pct(rates['after'])} |",
            f"| `{args.category}` test normals ({len(metrics_after['at_threshold'])} categories evaluated) | "
            f"{pct(payload['test_frr']['before'])} | {pct(payload['test_frr']['after'])} |",
            f"| the {report.get('feedback', 0)} feedback images themselves (now training/calibration data) | "
            f"{report.get('rejected_when_sent', 0)} of {report.get('feedback', 0)} | "
            f"{report.get('rejected_now', 0)} of {report.get('feedback', 0)} |",
            "",
            f"Mean mAD (test) before {100 * payload['mad']['before']:.1f}, after {100 * payload['mad']['after']:.1f}.",
        ]
    )
    print(Path(write_results("feedback_loop", payload, table)).read_text())


if __name__ == "__main__":
    main()
