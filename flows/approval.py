"""A person's decision before a retrained model is promoted (``retrain.approval: required``).

The retrain flow trains and evaluates as usual, with the export stage holding the promotion. When the rule would
promote the challenger (not worse than the champion), the run pauses (Prefect's ``pause_flow_run`` with typed
input): the Prefect UI shows the metrics diff against the champion and a form (promote yes/no, reviewer, note).
The answer re-runs the export stage, which promotes (the reviewer named in the champion record) or keeps the
challenger (the answer in metrics/export.json). Without an answer within ``retrain.approval_timeout_hours`` the
run fails and rolls back like any failed run: nothing lands, the images stay in the inbox for the next run.

Answer from a terminal: ``python -m flows.approval`` lists the runs that wait, and
``python -m flows.approval RUN_ID promote|keep --reviewer NAME --note TEXT`` answers one.
"""

from __future__ import annotations

import argparse
from uuid import UUID

from prefect.input import RunInput
from pydantic import Field

from vqflow.model_store import COMPARED

FLOW_NAME = "vqflow-retrain"
MODES = ("auto", "required")


class Approval(RunInput):
    """The reviewer's answer, the form of Prefect's resume dialog."""

    promote: bool = Field(description="true: the challenger becomes the champion; false: the champion stays")
    reviewer: str = Field("", description="who decided (kept in the champion record or metrics/export.json)")
    note: str = Field("", description="why")


def mode(params: dict) -> tuple[str, float]:
    """``retrain.approval`` (auto | required) and ``retrain.approval_timeout_hours``, checked."""
    section = params.get("retrain") or {}
    chosen = str(section.get("approval", "auto"))
    if chosen not in MODES:
        raise ValueError(f"params.yaml retrain.approval: {chosen!r} is not one of {', '.join(MODES)}")
    hours = float(section.get("approval_timeout_hours", 24))
    if hours <= 0:
        raise ValueError(f"params.yaml retrain.approval_timeout_hours: {hours} must be > 0")
    return chosen, hours


def comparison(before: dict | None, after: dict) -> str:
    """Markdown: the mean metrics and each category's mAD of the champion (``before``, metrics JSON or None)
    against the challenger (``after``), in points."""

    def row(name: str, old: float | None, new: float) -> str:
        change = "new" if old is None else f"{100 * (new - old):+.2f}"
        return f"| {name} | {'-' if old is None else f'{100 * old:.2f}'} | {100 * new:.2f} | {change} |"

    lines = ["| metric | champion | challenger | change |", "|---|---:|---:|---:|"]
    lines += [
        row(f"mean {name}", (before or {}).get("mean", {}).get(name), after["mean"][name])
        for name in COMPARED
        if name in after["mean"]
    ]
    lines += [
        row(f"{category} mAD", (before or {}).get("per_category", {}).get(category, {}).get("mad"), values["mad"])
        for category, values in after["per_category"].items()
    ]
    return "\n".join(lines)


def request(record: dict, champion: dict | None, metrics: dict, images: int) -> str:
    """The markdown a reviewer reads before answering."""
    who = f"the champion {champion['tag']}" if champion else "no champion yet"
    return (
        f"# Promote {record['tag']}?\n\n"
        f"Retrained with {images} new normal images; compared with {who} "
        "(test split, points; the promotion rule: "
        + "; ".join(r for r in record["reasons"] if not r.startswith("not promoted: "))
        + ").\n\n"
        + comparison(champion["metrics"] if champion else None, metrics)
        + "\n\nAnswer `promote: true` to make it the champion, `false` to keep the champion."
    )


def hold_reason(answer: Approval | None, hours: float) -> str:
    """Why the export stage keeps the challenger ("" when the answer is to promote)."""
    if answer is None:
        return f"awaiting a person's approval (retrain.approval: required, at most {hours:g} h)"
    if answer.promote:
        return ""
    return f"kept as challenger by {answer.reviewer or 'a reviewer'}" + (f": {answer.note}" if answer.note else "")


def promotion_note(answer: Approval) -> str:
    """The prefix of the champion record's reason for an approved model."""
    return f"approved by {answer.reviewer or 'a reviewer'}" + (f" ({answer.note})" if answer.note else "") + "; "


def waiting_runs() -> list:
    """The retrain runs paused for an answer, oldest first."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterStateName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            flow_run_filter=FlowRunFilter(state=dict(name=FlowRunFilterStateName(any_=["Paused"]))),
        )
    return sorted(runs, key=lambda run: run.start_time or run.created)


def question(run) -> str:
    """The markdown a paused run asks its reviewer (what the Prefect UI shows above the form)."""
    from prefect.input.actions import read_flow_run_input

    return read_flow_run_input(run.state.state_details.run_input_keyset["description"], flow_run_id=run.id) or ""


def answer(run_id: str, promote: bool, reviewer: str = "", note: str = "") -> None:
    """Resume a paused retrain run with the decision."""
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(UUID(run_id), run_input={"promote": promote, "reviewer": reviewer, "note": note})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.approval", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id", nargs="?", help="the paused run (none: list the runs that wait)")
    parser.add_argument("decision", nargs="?", choices=["promote", "keep"])
    parser.add_argument("--reviewer", default="")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    if args.run_id is None:
        runs = waiting_runs()
        for run in runs:
            print(f"run {run.id} ({run.name}), paused since {run.state.timestamp:%Y-%m-%d %H:%M} UTC:\n")
            print(question(run) + "\n")
        print(f"{len(runs)} retrain runs wait for an answer")
        return
    if args.decision is None:
        parser.error("the decision is missing: promote or keep")
    answer(args.run_id, args.decision == "promote", args.reviewer, args.note)
    print(f"{args.run_id}: {args.decision} sent")


if __name__ == "__main__":
    main()
